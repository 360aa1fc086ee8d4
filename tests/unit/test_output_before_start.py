"""A job's container is created while its output file system is made, and starts only
once that file system is mounted (agent/jobs/runner.py, ``_prepare_and_start``).

On the fake runtime, with a mounter that the test holds or fails. A container started
before the mount would let the job write to the bare directory on the node's disk,
outside its result cap.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from agent.jobs.outputfs import OutputFsError, OutputVolumes
from agent.runtime.base import ContainerSpec
from agent.runtime.fake import FakeEngine, FakeRuntime
from tests.helpers.env import seconds
from tests.helpers.fakejobs import FakeJobs, fake_jobs


class Created(FakeRuntime):
    """The fake runtime, with an event set once a container was created."""

    def __init__(self, engine: FakeEngine) -> None:
        super().__init__(engine)
        self.created = threading.Event()

    def create(self, spec: ContainerSpec) -> str:
        cid = super().create(spec)
        self.created.set()
        return cid


class HeldMount:
    """Mounts nothing; each mount waits until the container was created, then until the
    test releases it (or fails it), and notes what the engine had been asked by then."""

    def __init__(self, runtime: Created, *, fail: bool = False) -> None:
        self.runtime = runtime
        self.fail = fail
        self.release = threading.Event()
        self.calls_when_mounted: list[str] | None = None

    def mount(self, image: Path, target: Path) -> None:
        assert self.runtime.created.wait(seconds(10)), "no container created while mounting"
        if self.fail:
            raise OutputFsError("mounting a job's output: no loop device left")
        assert self.release.wait(seconds(10))
        self.calls_when_mounted = list(self.runtime.engine.calls)

    def unmount(self, target: Path) -> None:
        pass


def _held(f: FakeJobs, *, fail: bool = False) -> HeldMount:
    runtime = Created(f.engine)
    mount = HeldMount(runtime, fail=fail)
    f.system.ctx.runtime = runtime
    f.system.ctx.outputs = OutputVolumes(f.state_dir / "jobs", f.config.runtime.job_user, mount)
    return mount


def test_the_container_is_created_during_the_mount_and_started_after_it(tmp_path: Path) -> None:
    """The mount and the container's creation overlap (the job starts sooner), and the
    container never starts on a bare output directory."""

    async def main() -> None:
        async with fake_jobs(tmp_path) as f:
            mount = _held(f)
            f.engine.behave("j-1", run_s=None)
            await f.assign("j-1")
            assert await asyncio.to_thread(mount.runtime.created.wait, seconds(10))
            assert "start" not in f.engine.calls
            mount.release.set()
            await f.link.state("j-1", "running")
            assert mount.calls_when_mounted is not None
            assert "create" in mount.calls_when_mounted
            assert "start" not in mount.calls_when_mounted

    asyncio.run(main())


def test_a_failed_mount_after_the_create_ends_the_job_and_removes_its_container(
    tmp_path: Path,
) -> None:
    """The output file system cannot be mounted although the container was created: the
    container must never start, and neither it nor the output may be left behind."""

    async def main() -> None:
        async with fake_jobs(tmp_path) as f:
            _held(f, fail=True)
            await f.assign("j-1")
            end = await f.ended("j-1")
            assert (end["state"], end["reason"]) == ("failed", "agent_error")
            assert "start" not in f.engine.calls
            assert f.engine.container_ids() == []
            assert not (f.state_dir / "jobs" / "j-1").exists()

    asyncio.run(main())


class SlowCreate(FakeRuntime):
    """The fake runtime, whose create waits for the test (an engine slow to answer)."""

    def __init__(self, engine: FakeEngine) -> None:
        super().__init__(engine)
        self.entered = threading.Event()
        self.go = threading.Event()

    def create(self, spec: ContainerSpec) -> str:
        self.entered.set()
        assert self.go.wait(seconds(10))
        return super().create(spec)


class FailingMount:
    def mount(self, image: Path, target: Path) -> None:
        raise OutputFsError("mounting a job's output: no loop device left")

    def unmount(self, target: Path) -> None:
        pass


def test_a_shutdown_during_the_create_leaves_the_job_to_the_next_start(tmp_path: Path) -> None:
    """The agent stops while the engine creates a container and the output's mount fails
    meanwhile: the mount's error must not turn the shutdown into a failed job. The job
    keeps its state for the next start, which makes its output again."""

    async def main() -> None:
        async with fake_jobs(tmp_path) as f:
            runtime = SlowCreate(f.engine)
            f.system.ctx.runtime = runtime
            f.system.ctx.outputs = OutputVolumes(
                f.state_dir / "jobs", f.config.runtime.job_user, FailingMount()
            )
            await f.assign("j-1")
            assert await asyncio.to_thread(runtime.entered.wait, seconds(10))
            (task,) = [t for t in asyncio.all_tasks() if t.get_name() == "job-j-1"]
            task.cancel()  # what the daemon's shutdown does to every runner
            done, _ = await asyncio.wait({task}, timeout=seconds(10))
            runtime.go.set()
            assert done == {task}
            assert task.cancelled(), "the runner ended the job instead of leaving it"
            assert f.link.states("j-1") == ["accepted", "preparing"]
            stored = f.system.store.get("j-1")
            assert stored is not None and stored.state.value == "preparing"

    asyncio.run(main())
