"""Assembling the job system: the store, the runner context, the manager.

Kept apart from the daemon so that the daemon only wires parts together, and so that
tests can build the same job system around a real engine without a daemon.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import structlog

from agent.airlock.approvals import ApprovalStore
from agent.airlock.hold import Airlock, ReviewCommandFn
from agent.audit import AuditError, AuditLedger, ledger_path
from agent.config import Config
from agent.dispatch import Dispatcher
from agent.errors import ModelStorageError
from agent.gpu.base import GpuInventory
from agent.jobs.context import RunnerContext, Signal
from agent.jobs.gpus import GpuLeases
from agent.jobs.joblogs import JobLogs, logs_dir
from agent.jobs.livepool import LivePool
from agent.jobs.manager import JobManager
from agent.jobs.model import State
from agent.jobs.outputfs import OutputVolumes
from agent.jobs.store import AuditAnchor, JobStore, StoreError, store_path
from agent.link import Uplink
from agent.models.cache import ModelCache
from agent.models.fetch import ArtifactFetcher
from agent.results.delivery import ResultDelivery
from agent.results.spool import Spool
from agent.results.uploader import Uploader
from agent.runtime.base import Runtime

log = structlog.get_logger(__name__)


@dataclass
class JobSystem:
    manager: JobManager
    store: JobStore
    ctx: RunnerContext
    wait_pool: ThreadPoolExecutor
    fetcher: ArtifactFetcher
    audit: AuditLedger
    session: Dispatcher  # the connection's SessionHandler

    async def janitor_pass(self, retention_s: float) -> None:
        """Delete results delivered more than ``retention_s`` ago, and forget jobs ended
        long enough ago (7 days, or ``retention_s`` when longer: ``jobs --all`` lists a
        job as long as its results are kept) that a resent assignment is no longer a
        duplicate."""
        gone = await asyncio.to_thread(self.ctx.results.spool.purge_delivered, retention_s)
        if gone:
            log.info("delivered_results_deleted", jobs=gone)
        self.store.forget_old(keep_s=retention_s)
        if self.ctx.airlock is not None:  # holds of jobs no longer held (agent.airlock)
            self.ctx.airlock.prune(lambda job_id: _may_be_held(self.store, job_id))

    async def close(self) -> None:
        """Stop runners (containers keep running), release threads, close the store."""
        await self.manager.stop()
        await self.fetcher.close()
        self.audit.close()
        if self.ctx.airlock is not None:
            self.ctx.airlock.store.close()
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
    on_change: Callable[[], None] = lambda: None,
    review_command: ReviewCommandFn | None = None,
) -> JobSystem:
    """Open the store in ``state_dir`` and build the manager. Raises ``StoreError``."""
    first = config()
    store = JobStore(state_dir / "jobs.db")
    # One thread per running job's wait, plus one spare: see JobRunner._wait_briefly.
    wait_pool = LivePool(lambda: config().limits.max_concurrent_jobs + 1, "job-wait")
    uplink = Uplink()
    try:
        # The anchor in the job store makes a deleted or shortened ledger fail to open.
        audit = AuditLedger(ledger_path(state_dir), AuditAnchor(store_path(state_dir)))
    except AuditError as exc:
        raise StoreError(f"audit ledger: {exc}") from exc
    spool = Spool(state_dir / "spool")
    # The uploader records each file once and every resent range before the bytes go.
    uploader = Uploader(uplink, spool, ledger=audit)
    fetcher = ArtifactFetcher(uplink, state_dir / "artifacts")
    try:
        models = ModelCache(state_dir / "models", lambda: config().models.cache_max_mib, fetcher)
    except ModelStorageError as exc:
        raise StoreError(str(exc)) from exc
    ctx = RunnerContext(
        runtime=runtime,
        leases=GpuLeases(),
        node_id=first.node.id,
        # Every value a SIGHUP may change is read through ``config`` when a job needs
        # it, never copied here: agent.reload calls them applied (tests/integration/
        # test_reload_keys.py holds it to that).
        job_user=lambda: config().runtime.job_user,
        outputs=OutputVolumes(state_dir / "jobs", lambda: config().runtime.job_user),
        stop_grace_s=lambda: float(config().runtime.stop_grace_s),
        allow_pull=lambda: config().runtime.pull,
        gpu_inventory=gpus,
        resources_changed=Signal(),
        wait_pool=wait_pool,
        results=ResultDelivery(
            spool,
            uploader,
            on_accepted=lambda mf: audit.result_accepted(mf.job_id, len(mf.files), mf.total_bytes),
        ),
        models=models,
        audit=audit,
        job_logs=JobLogs(logs_dir(state_dir), lambda: config().logging.job_log_tail_kib * 1024),
        airlock=Airlock(
            lambda: config().results,
            ApprovalStore(store_path(state_dir)),
            spool,
            audit,
            lambda: config().runtime.job_user,
            review_command or _sandboxed_review_command(),
        ),
    )
    manager = JobManager(
        config=config,
        store=store,
        ctx=ctx,
        uplink=uplink,
        node_cpus=node_cpus,
        gpu_support=gpu_support,
        gpus=gpus,
        audit=audit,
        on_change=on_change,
    )
    session = Dispatcher(uplink=uplink, jobs=manager, results=uploader, artifacts=fetcher)
    return JobSystem(manager, store, ctx, wait_pool, fetcher, audit, session)


def _may_be_held(store: JobStore, job_id: str) -> bool:
    """Whether ``job_id`` is held or may still be (running, or held before a restart not
    yet recovered): its review rows must stay. Not once it is uploading or ended."""
    record = store.get(job_id)
    return record is not None and not record.state.terminal and record.state is not State.UPLOADING


def _sandboxed_review_command() -> ReviewCommandFn | None:
    """The real ``review_command`` runner (agent.airlock.command), looked up by name so
    that the job system builds without it (then a configured command is never run and
    every held job waits for a person)."""
    try:
        module = importlib.import_module("agent.airlock.command")
    except ImportError:
        return None
    found: ReviewCommandFn | None = getattr(module, "run_review_command", None)
    return found
