"""What the runners of one node share, and the small types a runner is driven by.

:class:`RunnerContext` is built once (``agent.jobs.setup``) and owned by the job
manager; :class:`Resume` says where a re-adopted job picks up; :class:`Signal` wakes
jobs waiting for GPUs; :class:`JobEnded` ends a job early from inside its runner.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from agent.airlock.hold import Airlock
from agent.audit import AuditLedger
from agent.jobs.gpus import GpuLeases
from agent.jobs.joblogs import JobLogs
from agent.jobs.model import State
from agent.jobs.outputfs import OutputVolumes
from agent.models.cache import ModelCache
from agent.results.delivery import ResultDelivery
from agent.runtime.base import Runtime
from agent.runtime.watch import EngineWatch


class JobEnded(Exception):
    """Raised inside the runner to end the job early, in a failed or cancelled state.
    (A job that succeeds is not an exception: :meth:`JobRunner._run` returns.)"""

    def __init__(self, state: State, reason: str, exit_code: int | None = None) -> None:
        super().__init__(f"{state.value}/{reason}")
        self.state, self.reason, self.exit_code = state, reason, exit_code


@dataclass(frozen=True)
class Resume:
    """Where a re-adopted job picks up after an agent restart."""

    container_id: str | None = None
    gpus: tuple[str, ...] = ()
    uploading: bool = False
    held: bool = False  # uploading=True too: its container exited 0 (agent.airlock)


class Signal:
    """A one-shot broadcast, re-armed on use: "GPUs were released or came back"."""

    def __init__(self) -> None:
        self._next: asyncio.Future[None] | None = None

    def next(self) -> asyncio.Future[None]:
        """A future resolved at the next :meth:`fire`."""
        if self._next is None or self._next.done():
            self._next = asyncio.get_running_loop().create_future()
        return self._next

    def fire(self) -> None:
        if self._next is not None and not self._next.done():
            self._next.set_result(None)
        self._next = None


@dataclass
class RunnerContext:
    """What every runner shares; owned by the job manager."""

    runtime: Runtime
    leases: GpuLeases
    node_id: str
    job_user: Callable[[], str]  # read per job: a reload may change it
    outputs: OutputVolumes
    stop_grace_s: Callable[[], float]
    allow_pull: Callable[[], bool]
    gpu_inventory: Callable[[], Any]
    resources_changed: Signal
    wait_pool: ThreadPoolExecutor
    results: ResultDelivery
    models: ModelCache | None = None
    audit: AuditLedger | None = None
    job_logs: JobLogs | None = None  # the tail of each job's output, kept before removal
    pull_timeout_s: float = 1800.0
    engine: EngineWatch | None = None  # agent.jobs.engine: outages end jobs container_lost
    airlock: Airlock | None = None  # results.review: hold results for review first
