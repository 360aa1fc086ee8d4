"""Assembling the job system: the store, the runner context, the manager.

Kept apart from the daemon so that the daemon only wires parts together, and so that
tests can build the same job system around a real engine without a daemon.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from agent.config import Config
from agent.gpu.base import GpuInventory
from agent.jobs.gpus import GpuLeases
from agent.jobs.manager import JobManager
from agent.jobs.runner import RunnerContext, Signal
from agent.jobs.store import JobStore
from agent.jobs.uplink import Uplink
from agent.runtime.base import Runtime


@dataclass
class JobSystem:
    manager: JobManager
    store: JobStore
    ctx: RunnerContext
    wait_pool: ThreadPoolExecutor

    async def close(self) -> None:
        """Stop runners (containers keep running), release threads, close the store."""
        await self.manager.stop()
        self.wait_pool.shutdown(wait=False, cancel_futures=True)
        self.store.close()


def build_jobs(
    config: Callable[[], Config],
    *,
    runtime: Runtime,
    state_dir: Path,
    gpus: Callable[[], GpuInventory | None],
    node_cpus: Callable[[], int],
    gpu_support: Callable[[], bool],
) -> JobSystem:
    """Open the store in ``state_dir`` and build the manager. Raises ``StoreError``."""
    first = config()
    store = JobStore(state_dir / "jobs.db")
    # One thread per running job's wait, plus one spare: see JobRunner._wait_briefly.
    wait_pool = ThreadPoolExecutor(
        max_workers=first.limits.max_concurrent_jobs + 1, thread_name_prefix="job-wait"
    )
    ctx = RunnerContext(
        runtime=runtime,
        leases=GpuLeases(),
        node_id=first.node.id,
        job_user=first.runtime.job_user,
        jobs_dir=state_dir / "jobs",
        stop_grace_s=lambda: float(config().runtime.stop_grace_s),
        allow_pull=lambda: config().runtime.pull,
        gpu_inventory=gpus,
        resources_changed=Signal(),
        wait_pool=wait_pool,
    )
    manager = JobManager(
        config=config,
        store=store,
        ctx=ctx,
        uplink=Uplink(),
        node_cpus=node_cpus,
        gpu_support=gpu_support,
        gpus=gpus,
    )
    return JobSystem(manager, store, ctx, wait_pool)
