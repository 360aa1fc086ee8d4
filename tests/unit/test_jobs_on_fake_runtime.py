"""The job manager and runner on the fake runtime: what the control plane hears.

Each test drives the real JobManager/JobRunner (built as the daemon builds them, with a
real SQLite store in tmp) against ``agent.runtime.fake`` and asserts the ``job.state``
messages, the store and the engine's containers. Time is the fake engine's clock or an
event; nothing sleeps. Docstrings name the failure each test reproduces.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from agent.jobs.admission import ACK_BACKLOG_PER_SLOT
from agent.jobs.store import JobStore
from agent.runtime.fake import FakeEngine, FakeRuntime
from tests.helpers.fakejobs import H100, IMAGE, fake_config, fake_jobs, two_gpus

START = ["accepted", "preparing", "running"]


def run(coro: Any) -> None:
    asyncio.run(coro)


def test_a_job_that_exits_nonzero_fails_with_its_code_and_leaves_nothing(tmp_path: Path) -> None:
    """A job's exit code lost or its container/output left behind after it ended."""

    async def main() -> None:
        async with fake_jobs(tmp_path) as f:
            f.engine.behave("j-1", run_s=5, exit_code=3)
            await f.assign("j-1")
            await f.link.state("j-1", "running")
            assert f.link.of("job.accepted", "j-1")
            f.engine.advance(5)
            end = await f.ended("j-1")
            assert (end["state"], end["reason"], end["exit_code"]) == ("failed", "exit_nonzero", 3)
            assert f.link.states("j-1") == [*START, "failed"]
            assert f.engine.container_ids() == []
            assert not (f.state_dir / "jobs" / "j-1").exists()
            stored = f.system.store.get("j-1")
            assert stored is not None and (stored.state.value, stored.exit_code) == ("failed", 3)

    run(main())


def test_oom_and_start_errors_end_with_their_reasons(tmp_path: Path) -> None:
    """An OOM-killed job reported as a plain non-zero exit; a start failure as agent_error."""

    async def main() -> None:
        async with fake_jobs(tmp_path) as f:
            f.engine.behave("j-oom", oom=True)
            f.engine.behave("j-bad", start_error="nvidia-container-cli: driver not loaded")
            await f.assign("j-oom")
            await f.assign("j-bad")
            oom, bad = await f.ended("j-oom"), await f.ended("j-bad")
            assert (oom["state"], oom["reason"], oom["exit_code"]) == ("failed", "oom_killed", 137)
            assert (bad["state"], bad["reason"]) == ("failed", "container_error")
            assert f.engine.container_ids() == []

    run(main())


def test_slots_refuse_no_capacity_until_the_end_is_acknowledged(tmp_path: Path) -> None:
    """A node overcommitted past max_concurrent_jobs, or ended jobs piling up unacknowledged."""

    async def main() -> None:
        async with fake_jobs(tmp_path, config=fake_config(tmp_path, max_concurrent_jobs=1)) as f:
            f.engine.behave("j-1", run_s=None)
            await f.assign("j-1")
            await f.link.state("j-1", "running")
            await f.assign("j-2")
            assert [r["code"] for r in f.link.of("job.rejected", "j-2")] == ["no_capacity"]
            f.engine.exit("j-1", 1)
            await f.ended("j-1")
            # The slot is free at the end; ended jobs awaiting job.ack are bounded apart.
            for n in range(2, 2 + ACK_BACKLOG_PER_SLOT - 1):
                f.engine.behave(f"j-{n}", exit_code=1)
                await f.assign(f"j-{n}")
                await f.ended(f"j-{n}")
            await f.assign("j-full")
            assert [r["code"] for r in f.link.of("job.rejected", "j-full")] == ["no_capacity"]
            await f.ack("j-1")
            assert "j-1" not in {j["job_id"] for j in f.system.manager.hello_jobs()}
            await f.assign("j-next")
            assert f.link.of("job.accepted", "j-next")

    run(main())


def test_a_repeated_assignment_is_accepted_once_and_an_ended_one_is_a_duplicate(
    tmp_path: Path,
) -> None:
    """A resent job.assign starting a second container for the same job."""

    async def main() -> None:
        async with fake_jobs(tmp_path) as f:
            f.engine.behave("j-1", run_s=None)
            await f.assign("j-1")
            await f.link.state("j-1", "running")
            await f.assign("j-1")
            assert len(f.link.of("job.accepted", "j-1")) == 2
            assert len(f.engine.container_ids()) == 1
            f.engine.exit("j-1", 2)
            await f.ended("j-1")
            await f.assign("j-1")
            assert [r["code"] for r in f.link.of("job.rejected", "j-1")] == ["duplicate_job"]
            await f.ack("j-404")
            errors = [(e["code"], e.get("detail"), e.get("ref")) for e in f.link.of("error")]
            assert errors == [("unknown_job", "j-404", "job.ack")]

    run(main())


def test_cancel_stops_a_running_job_even_one_that_ignores_sigterm(tmp_path: Path) -> None:
    """job.cancel leaving the container running (Task.cancel instead of an engine stop)."""

    async def main() -> None:
        async with fake_jobs(tmp_path) as f:
            f.engine.behave("j-1", run_s=None, ignores_term=True)
            await f.assign("j-1")
            await f.link.state("j-1", "running")
            await f.cancel("j-1")
            end = await f.ended("j-1")
            assert (end["state"], end["reason"], end["exit_code"]) == (
                "cancelled",
                "cancel_requested",
                137,
            )
            assert "stop" in f.engine.calls
            assert f.engine.container_ids() == []

    run(main())


def test_the_timeout_stops_a_job_that_runs_too_long(tmp_path: Path) -> None:
    """A job past its timeout_s left running (and its slot held) for ever."""

    async def main() -> None:
        async with fake_jobs(tmp_path) as f:
            f.engine.behave("j-1", run_s=None)
            await f.assign("j-1", timeout_s=1)
            end = await f.ended("j-1")
            assert (end["state"], end["reason"], end["exit_code"]) == ("timed_out", "timeout", 143)
            assert f.engine.container_ids() == []

    run(main())


def test_cancel_while_waiting_for_gpus_creates_no_container(tmp_path: Path) -> None:
    """A job cancelled while it waits for GPUs still starting once they are free."""

    async def main() -> None:
        async with fake_jobs(tmp_path, gpus=two_gpus()) as f:
            f.engine.behave("j-big", run_s=None)
            await f.assign("j-big", gpus={"count": 2, "types": [H100]})
            await f.link.state("j-big", "running")
            await f.assign("j-wait", gpus={"count": 1})
            await f.link.state("j-wait", "waiting")
            await f.cancel("j-wait")
            end = await f.ended("j-wait")
            assert (end["state"], end["reason"]) == ("cancelled", "cancel_requested")
            assert f.link.states("j-wait") == ["accepted", "waiting", "cancelled"]
            assert len(f.engine.container_ids()) == 1

    run(main())


def test_a_waiting_job_gets_the_gpus_when_they_are_released(tmp_path: Path) -> None:
    """A job waiting for GPUs that never notices their release (a lost wake-up)."""

    async def main() -> None:
        async with fake_jobs(tmp_path, gpus=two_gpus()) as f:
            f.engine.behave("j-big", run_s=None)
            f.engine.behave("j-next", run_s=None)
            await f.assign("j-big", gpus={"count": 2})
            await f.link.state("j-big", "running")
            await f.assign("j-next", gpus={"count": 1})
            await f.link.state("j-next", "waiting")
            f.engine.exit("j-big", 0 + 1)
            await f.ended("j-big")
            await f.link.state("j-next", "running")
            assert f.link.states("j-next") == ["accepted", "waiting", "preparing", "running"]
            snapshot = {j["job_id"]: j for j in f.system.manager.snapshot()}
            assert len(snapshot["j-next"]["gpus"]) == 1

    run(main())


def test_recovery_readopts_running_and_exited_and_ends_vanished_jobs(tmp_path: Path) -> None:
    """An agent restart losing jobs: a running one orphaned, an exited one's code
    forgotten, a vanished one never ended, a stray container left running."""

    async def main() -> None:
        engine = FakeEngine()
        engine.add_image(IMAGE)
        config = fake_config(tmp_path, max_concurrent_jobs=4)
        async with fake_jobs(tmp_path, engine, config) as before:
            for job in ("j-run", "j-exit", "j-gone"):
                engine.behave(job, run_s=None)
                await before.assign(job)
                await before.link.state(job, "running")
        # The agent is down: one job exits, one container disappears, one is a stray.
        engine.exit("j-exit", 4)
        runtime = FakeRuntime(engine)
        gone = next(c for c in runtime.list_jobs("test-node") if c.job_id == "j-gone")
        runtime.remove(gone.id)
        async with fake_jobs(tmp_path, engine, config) as after:
            assert {j["job_id"] for j in after.system.manager.hello_jobs()} == {
                "j-run",
                "j-exit",
                "j-gone",
            }
            await after.system.manager.recover(runtime.list_jobs("test-node"))
            lost = await after.ended("j-gone")
            assert (lost["state"], lost["reason"]) == ("failed", "container_lost")
            exited = await after.ended("j-exit")
            assert (exited["state"], exited["reason"], exited["exit_code"]) == (
                "failed",
                "exit_nonzero",
                4,
            )
            assert "failed" not in after.link.states("j-run")
            engine.exit("j-run", 6)
            end = await after.ended("j-run")
            assert (end["state"], end["exit_code"]) == ("failed", 6)
            assert engine.container_ids() == []

    run(main())


def test_recovery_reaps_containers_nobody_owns(tmp_path: Path) -> None:
    """A container of a job the store does not know left running after a restart."""

    async def main() -> None:
        engine = FakeEngine()
        engine.add_image(IMAGE)
        config = fake_config(tmp_path)
        async with fake_jobs(tmp_path, engine, config) as before:
            engine.behave("j-1", run_s=None)
            await before.assign("j-1")
            await before.link.state("j-1", "running")
        store = JobStore(config.state_dir / "jobs.db")
        record = store.get("j-1")
        assert record is not None
        record.acked_at = 1.0  # acknowledged: the store no longer owns it
        store.update(record)
        store.close()
        runtime = FakeRuntime(engine)
        async with fake_jobs(tmp_path, engine, config) as after:
            await after.system.manager.recover(runtime.list_jobs("test-node"))
            assert engine.container_ids() == []

    run(main())
