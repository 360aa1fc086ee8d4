"""The daemon's periodic looks at the node: GPUs and host, the state directory.

Each pass writes what it sees into the :class:`~agent.health.facts.NodeFacts` that
``/healthz``, ``/status``, metrics and heartbeats read, and never raises (but
``CancelledError``): a source that fails keeps its last sample and is logged through
:func:`agent.loops.guarded`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import structlog

from agent.config import Config
from agent.gpu.base import GpuBackend, GpuInventory, mark_allocatable
from agent.health.facts import NodeFacts
from agent.hostinfo import HostSampler
from agent.loops import LoopFailures, guarded
from agent.statedir import check_state_dir

log = structlog.get_logger(__name__)


class NodeSampler:
    """Samples into ``facts``; ``on_gpus`` is told after every GPU sample (a GPU may
    have come back: jobs waiting for GPUs look again)."""

    def __init__(
        self,
        facts: NodeFacts,
        config: Callable[[], Config],
        gpu: GpuBackend,
        failures: LoopFailures,
        on_gpus: Callable[[], None],
    ) -> None:
        self._facts = facts
        self._config = config
        self._gpu = gpu
        self._failures = failures
        self._on_gpus = on_gpus
        self._host = HostSampler(config().state_dir)

    async def sample(self) -> None:
        """Sample the GPUs and the host, each guarded on its own."""

        async def gpus() -> None:
            inventory: GpuInventory = await asyncio.to_thread(self._gpu.snapshot)
            self._facts.gpus = mark_allocatable(inventory, self._config().gpus.allow)

        async def host() -> None:
            self._facts.host = await asyncio.to_thread(self._host.sample)

        await guarded("gpu-sampler", gpus, self._failures)
        await guarded("host-sampler", host, self._failures)
        self._on_gpus()

    def reapply_gpu_allow(self) -> None:
        """After a reload: the last inventory under the new ``gpus.allow``."""
        if self._facts.gpus is not None:
            self._facts.gpus = mark_allocatable(self._facts.gpus, self._config().gpus.allow)

    async def check_state_dir(self, state_dir: Path) -> None:
        problem = await asyncio.to_thread(check_state_dir, state_dir)
        if problem != self._facts.state_dir_problem:
            if problem is None:
                log.info("state_dir_ok")
            else:
                log.warning("state_dir_problem", detail=problem.detail)
        self._facts.state_dir_problem = problem
