"""A job system on the fake runtime, for unit tests of the manager and the runner.

:func:`fake_jobs` builds the daemon's job system (``agent.jobs.setup.build_jobs``, the
same wiring) around a :class:`~agent.runtime.fake.FakeEngine`, with a real SQLite store
and audit ledger in a temporary state directory, and attaches a :class:`CapturingLink`
as the session. Outputs are plain directories (a mounter that mounts nothing), so no
test here needs loop devices; everything else is the real code.

Waiting is on events, never on time: :meth:`CapturingLink.state` returns when the job
has reported the state, or fails after a scaled deadline.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.config import Config, parse_config
from agent.gpu.base import GpuInventory, mark_allocatable
from agent.gpu.nvml import NvmlBackend
from agent.jobs.model import TERMINAL
from agent.jobs.outputfs import OutputVolumes
from agent.jobs.setup import JobSystem, build_jobs
from agent.protocol import messages
from agent.protocol.frames import decode_binary
from agent.runtime.fake import FakeEngine, FakeRuntime
from tests.fakes.nvml import two_gpu_fake
from tests.helpers.env import seconds, valid_config

IMAGE = "registry.example/provider/sepsis:1.4"
H100 = "NVIDIA H100 80GB HBM3"


class CapturingLink:
    """A session that keeps every message the agent sends, in order."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self._changed = asyncio.Condition()

    async def send(self, message: dict[str, Any]) -> None:
        async with self._changed:
            self.sent.append(message)
            self._changed.notify_all()

    async def send_frame(self, type_: str, frame: bytes | memoryview) -> None:
        sent = decode_binary(bytes(frame))
        await self.send({**sent.header, "_payload_bytes": len(sent.payload)})

    def of(self, type_: str, job_id: str | None = None) -> list[dict[str, Any]]:
        return [s for s in self.sent if s["type"] == type_ and job_id in (None, s.get("job_id"))]

    def states(self, job_id: str) -> list[str]:
        return [s["state"] for s in self.of("job.state", job_id)]

    async def state(self, job_id: str, *wanted: str, within_s: float = 10) -> dict[str, Any]:
        """The first ``job.state`` of ``job_id`` in ``wanted`` (any terminal state when
        none is given); fails when none came within ``seconds(within_s)``."""
        want = set(wanted) or {s.value for s in TERMINAL}

        def found() -> dict[str, Any] | None:
            return next((s for s in self.of("job.state", job_id) if s["state"] in want), None)

        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(found), seconds(within_s))
        result = found()
        assert result is not None
        return result


class NoMount:
    """Outputs stay plain directories: the runner's logic does not depend on the mount."""

    def mount(self, image: Path, target: Path) -> None:
        pass

    def unmount(self, target: Path) -> None:
        pass


@dataclass
class FakeJobs:
    engine: FakeEngine
    system: JobSystem
    link: CapturingLink
    config: Config
    state_dir: Path

    async def assign(self, job_id: str, **fields: Any) -> None:
        message = {"type": "job.assign", "job_id": job_id, "image": {"ref": IMAGE}}
        message |= {"datastore": "vitals", **fields}
        await self.system.session.on_message(self.link, messages.JobAssign.model_validate(message))

    async def ended(self, job_id: str) -> dict[str, Any]:
        """The job's terminal ``job.state``, once its runner has also cleaned up (the
        container and output go after the end is reported)."""
        end = await self.link.state(job_id)
        runner = [t for t in asyncio.all_tasks() if t.get_name() == f"job-{job_id}"]
        await asyncio.wait_for(asyncio.gather(*runner), seconds(10))
        return end

    async def cancel(self, job_id: str) -> None:
        await self.system.session.on_message(
            self.link, messages.JobCancel.model_validate({"type": "job.cancel", "job_id": job_id})
        )

    async def ack(self, job_id: str) -> None:
        await self.system.session.on_message(
            self.link, messages.JobAck.model_validate({"type": "job.ack", "job_id": job_id})
        )


def fake_config(tmp_path: Path, **limits: Any) -> Config:
    data = valid_config(tmp_path)
    data["runtime"] = {"allowed_images": ["registry.example/provider/*"]}
    data["limits"] = limits
    return parse_config(data)


@asynccontextmanager
async def fake_jobs(
    tmp_path: Path,
    engine: FakeEngine | None = None,
    config: Config | None = None,
    gpus: GpuInventory | None = None,
) -> AsyncIterator[FakeJobs]:
    """A job system on ``engine`` (a new one with :data:`IMAGE` by default) with the
    session up. Build a second on the same ``engine`` and ``config`` for an agent
    restart: it opens the same store. Closed (runners stopped, containers left) on exit."""
    if engine is None:
        engine = FakeEngine(gpu_support=True)
        engine.add_image(IMAGE)
    config = config or fake_config(tmp_path)
    state_dir = config.state_dir
    state_dir.mkdir(parents=True, exist_ok=True)
    inventory = gpus
    system = build_jobs(
        lambda: config,
        runtime=FakeRuntime(engine),
        state_dir=state_dir,
        gpus=lambda: inventory,
        node_cpus=lambda: 8,
        gpu_support=lambda: True,
    )
    system.ctx.outputs = OutputVolumes(state_dir / "jobs", config.runtime.job_user, NoMount())
    link = CapturingLink()
    await system.session.on_established(link)
    try:
        yield FakeJobs(engine, system, link, config, state_dir)
    finally:
        await system.close()


def two_gpus() -> GpuInventory:
    return mark_allocatable(NvmlBackend(two_gpu_fake()).snapshot(), "all")
