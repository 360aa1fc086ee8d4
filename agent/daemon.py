"""The daemon: wires the parts, owns every long-lived task, and climbs the signal ladder.

Lifecycle (after uvicorn's server): startup → main loop → shutdown.

- startup: prepare the state directory, take a first sample, start the health server,
  confirm it answers, then tell systemd ``READY=1``.
- main loop: independent tasks, one owner each (this class): the loop heartbeat, the
  sampler (GPUs, host), the state-directory check, the runtime probe, the janitor and
  the systemd watchdog. A failed pass of a periodic loop is logged and the loop goes
  on (``agent.loops``): no sampler or probe error ends the daemon. Only a task that is
  not periodic (the control-plane link, job recovery) ends it when it fails.
- shutdown: the first SIGTERM/SIGINT sets a flag; the daemon says ``STOPPING=1``,
  cancels its tasks, stops the health server and returns. A second signal cancels at
  once. SIGHUP reloads what can be reloaded (``agent.reload``).

Job containers are never children of this process, so stopping it leaves them running.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import structlog

from agent import __version__, inventory, logs
from agent.config import Config, ControlPlaneConfig, load_config
from agent.config.host_warnings import host_warnings
from agent.connection import Connection
from agent.errors import AgentError, HealthServerError
from agent.gpu.base import GpuBackend, GpuInventory, mark_allocatable
from agent.health.facts import (
    LOOP_TICK_S,
    ControlPlaneFacts,
    NodeFacts,
    Problem,
    assess,
    watchdog_ok,
)
from agent.health.metrics import AgentCollector, build_registry, render
from agent.health.server import Endpoints, HealthServer
from agent.health.status import status_document
from agent.hostinfo import HostSampler
from agent.jobs.setup import JobSystem, build_jobs
from agent.jobs.store import StoreError
from agent.loops import LoopFailures, every, guarded
from agent.reload import plan_reload
from agent.runtime.base import Runtime
from agent.statedir import check_state_dir, prepare_state_dir
from agent.systemd import Notifier, status_line

log = structlog.get_logger(__name__)

SAMPLE_INTERVAL_S = 10.0  # GPU and host telemetry; heartbeats (15 s) carry the latest
STATE_DIR_CHECK_S = 30.0
RUNTIME_PROBE_S = 60.0
JANITOR_S = 600.0


class Daemon:
    """One running agent. Call :meth:`run` once, from ``asyncio.run``."""

    def __init__(
        self,
        config: Config,
        *,
        gpu: GpuBackend,
        notifier: Notifier,
        runtime: Runtime,
        config_path: Path | None = None,
    ) -> None:
        self.config = config
        self._config_path = config_path
        self._gpu = gpu
        self._notifier = notifier
        self._runtime = runtime
        self._jobs: JobSystem | None = None
        self.facts = NodeFacts()
        if config.control_plane is not None:
            self.facts.control_plane = ControlPlaneFacts(configured=True, state="disconnected")
        self._stop = asyncio.Event()
        self._signals = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._failed: BaseException | None = None
        self._failures = LoopFailures()
        self._host_sampler = HostSampler(config.state_dir)
        host, port = config.health.address
        self._health = HealthServer(
            host,
            port,
            Endpoints(problems=self.problems, status=self.status, metrics=self._metrics),
        )
        self._registry = build_registry(
            AgentCollector(
                self.facts, node_id=config.node.id, version=__version__, assess=self.problems
            )
        )

    # -- what the health server reads (from its own thread) ---------------------------

    def problems(self) -> list[Problem]:
        return assess(self.facts, max_disconnected_s=self.config.health.max_disconnected_s)

    def status(self) -> dict[str, Any]:
        return status_document(self.facts, self.config, self.problems())

    def _metrics(self) -> bytes:
        return render(self._registry)

    # -- lifecycle -------------------------------------------------------------------

    async def run(self) -> None:
        """Run until asked to stop. Raises :class:`AgentError` if startup fails."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_reload_signal)
        try:
            await self._startup()
            self._spawn(self._heartbeat(), "loop-heartbeat")
            self._repeat("sampler", SAMPLE_INTERVAL_S, self._sample_once)
            self._repeat("state-dir-check", STATE_DIR_CHECK_S, self._check_state_dir)
            self._repeat("runtime-probe", RUNTIME_PROBE_S, self._probe_runtime)
            self._spawn(self._jobs_and_link(), "jobs-and-control-plane")
            if self._notifier.watchdog_interval_s:
                interval = self._notifier.watchdog_interval_s
                self._repeat("watchdog", interval, self._watchdog_pass, wait_first=False)
            await self._stop.wait()
        finally:
            await self._shutdown()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)

    async def _startup(self) -> None:
        self._notifier.status("starting")
        self.facts.state_dir_problem = await asyncio.to_thread(
            prepare_state_dir, self.config.state_dir
        )
        self.facts.runtime = await asyncio.to_thread(self._runtime.info)
        await self._sample_once()  # never raises: a node without host facts still starts
        self._health.start()
        host, port = self._health.address
        if not await asyncio.to_thread(self._health.answers):
            raise HealthServerError(f"health server on {host}:{port} does not answer")
        log.info(
            "agent_started",
            node_id=self.config.node.id,
            version=__version__,
            health=f"{host}:{port}",
            gpus=len(self.facts.gpus.gpus) if self.facts.gpus else 0,
            control_plane=self.facts.control_plane.state,
            open_files_limit=resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        )
        self._notifier.ready(self._status_line())

    async def _shutdown(self) -> None:
        self._notifier.stopping("stopping")
        log.info("agent_stopping")
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self._jobs is not None:
            await self._jobs.close()
        await asyncio.to_thread(self._health.stop)
        await asyncio.to_thread(self._gpu.close)
        log.info("agent_stopped")

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(self._on_task_done)
        self._tasks.append(task)

    def _repeat(
        self,
        name: str,
        interval_s: float,
        body: Callable[[], Awaitable[None]],
        *,
        wait_first: bool = True,
    ) -> None:
        loop = every(name, interval_s, body, self._failures, wait_first=wait_first)
        self._spawn(loop, name)

    def _on_task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            # Periodic loops never get here (agent.loops). A dead one-off owner (the link,
            # recovery) would leave a part silently missing: stop loudly instead, and let
            # systemd's Restart=on-failure bring the agent back.
            log.error("task_failed", task=task.get_name(), error=repr(exc), exc_info=exc)
            self._failed = exc
            self._stop.set()

    @property
    def failure(self) -> BaseException | None:
        """The exception that killed a task, if the daemon stopped because of one."""
        return self._failed

    def _on_stop_signal(self, sig: signal.Signals) -> None:
        self._signals += 1
        if self._signals == 1:
            log.info("stop_requested", signal=sig.name)
            self._stop.set()
        else:
            log.warning("stop_forced", signal=sig.name)
            for task in asyncio.all_tasks():
                task.cancel()

    def _on_reload_signal(self) -> None:
        # A reload that fails in an unforeseen way keeps the running config; it must not
        # stop the daemon.
        self._spawn(guarded("reload", self._reload, self._failures), "reload")

    # -- the owner loops ------------------------------------------------------------------

    async def _jobs_and_link(self) -> None:
        # No job store, no jobs: an agent that cannot record what it accepts must not
        # take work. Until the store opens, /healthz says why and the link stays down.
        while self._jobs is None:
            try:
                self._jobs = build_jobs(
                    lambda: self.config,
                    runtime=self._runtime,
                    state_dir=self.config.state_dir,
                    gpus=lambda: self.facts.gpus,
                    node_cpus=lambda: self.facts.host.cpu_logical if self.facts.host else 1,
                    gpu_support=lambda: bool(self.facts.runtime and self.facts.runtime.gpu_support),
                )
            except StoreError as exc:
                log.error("job_store_unavailable", error=str(exc), retry_in_s=STATE_DIR_CHECK_S)
                await asyncio.sleep(STATE_DIR_CHECK_S)
        self._jobs.manager.on_change.append(self._publish_jobs)
        self._publish_jobs()
        self._spawn(self._recover_jobs(self._jobs), "job-recovery")
        jobs = self._jobs
        self._repeat("janitor", JANITOR_S, lambda: self._janitor_pass(jobs), wait_first=False)
        if self.config.control_plane is not None:
            await self._connection(self.config.control_plane).run()

    async def _janitor_pass(self, jobs: JobSystem) -> None:
        # Delivered results are kept results.retention_h, then deleted; ended jobs are
        # remembered 7 days for duplicate_job, then forgotten.
        retention_s = self.config.results.retention_h * 3600
        gone = await asyncio.to_thread(jobs.ctx.results.spool.purge_delivered, retention_s)
        if gone:
            log.info("delivered_results_deleted", jobs=gone)
        jobs.store.forget_old()

    async def _recover_jobs(self, jobs: JobSystem) -> None:
        # Until the engine answers, nothing can be said about the containers: wait for
        # it rather than declare running jobs lost.
        while True:
            try:
                containers = await asyncio.to_thread(self._runtime.list_jobs, self.config.node.id)
                break
            # Not only AgentError: an OSError (EMFILE) while asking is just as passing.
            except Exception as exc:
                log.error("job_recovery_waiting_for_engine", error=str(exc), retry_in_s=10)
                await asyncio.sleep(10)
        await jobs.manager.recover(containers)

    def _connection(self, cp: ControlPlaneConfig) -> Connection:
        def publish(facts: ControlPlaneFacts) -> None:
            previous, self.facts.control_plane = self.facts.control_plane.state, facts
            if facts.state != previous:  # systemctl status: now, not at the next watchdog
                self._notifier.status(self._status_line())

        assert self._jobs is not None
        return Connection(
            cp,
            hello=lambda jobs: inventory.hello(self.config, self.facts, jobs),
            telemetry=lambda jobs: inventory.telemetry(self.facts, jobs),
            handler=self._jobs.manager,
            publish=publish,
            stats=self.facts.messages,
            user_agent=f"cloudbender-agent/{__version__}",
        )

    async def _probe_runtime(self) -> None:
        self.facts.runtime = await asyncio.to_thread(self._runtime.info)

    async def _heartbeat(self) -> None:
        while True:
            self.facts.loop_tick = time.monotonic()
            await asyncio.sleep(LOOP_TICK_S)

    async def _sample_once(self) -> None:
        """Sample the GPUs and the host. Never raises (but ``CancelledError``).

        Each source is guarded on its own: one that fails keeps its last sample (or
        none) and is logged, and does not keep the other from being sampled.
        """

        async def gpus() -> None:
            inventory: GpuInventory = await asyncio.to_thread(self._gpu.snapshot)
            self.facts.gpus = mark_allocatable(inventory, self.config.gpus.allow)

        async def host() -> None:
            self.facts.host = await asyncio.to_thread(self._host_sampler.sample)

        await guarded("gpu-sampler", gpus, self._failures)
        await guarded("host-sampler", host, self._failures)
        if self._jobs is not None:
            # A GPU may have come back: let jobs waiting for GPUs look again.
            self._jobs.ctx.resources_changed.fire()

    def _publish_jobs(self) -> None:
        assert self._jobs is not None
        self.facts.jobs = tuple(self._jobs.manager.snapshot())
        self.facts.tally = self._jobs.manager.tally

    async def _check_state_dir(self) -> None:
        problem = await asyncio.to_thread(check_state_dir, self.config.state_dir)
        if problem != self.facts.state_dir_problem:
            if problem is None:
                log.info("state_dir_ok")
            else:
                log.warning("state_dir_problem", detail=problem.detail)
        self.facts.state_dir_problem = problem

    async def _watchdog_pass(self) -> None:
        # A pass that raises sends no WATCHDOG=1: if it keeps failing, systemd restarts
        # the agent, which is what the watchdog is for.
        problems = self.problems()
        if watchdog_ok(problems):
            self._notifier.watchdog()
        self._notifier.status(self._status_line(problems))

    async def _reload(self) -> None:
        if self._config_path is None:
            log.warning("config_reload_skipped", reason="no config file")
            return
        try:
            new = await asyncio.to_thread(load_config, self._config_path)
        except AgentError as exc:
            problems = getattr(exc, "problems", [str(exc)])
            log.error("config_reload_failed", problems=problems, kept="previous config")
            return
        plan = plan_reload(self.config, new)
        self.config = plan.config
        logs.configure(self.config.logging.level, self.config.logging.format)
        self.facts.gpus = (
            mark_allocatable(self.facts.gpus, self.config.gpus.allow) if self.facts.gpus else None
        )
        log.info(
            "config_reloaded",
            applied=list(plan.applied),
            needs_restart=list(plan.needs_restart),
        )

    def _status_line(self, problems: list[Problem] | None = None) -> str:
        return status_line(self.facts, self.problems() if problems is None else problems)


def serve(
    config: Config,
    *,
    gpu: GpuBackend,
    runtime: Runtime,
    config_path: Path | None = None,
) -> int:
    """Configure logging, run the daemon to completion, return the process exit status.

    Sets the process umask to 0077 first, whoever started the daemon (the CLI, a test
    launcher, a shell without systemd's ``UMask=``): everything it creates (the job
    store and its ``-wal``/``-shm`` files, spool, ledger) is the owner's alone.
    Raises :class:`~agent.errors.StateDirError` when the state directory cannot be
    made private (``agent.statedir``).
    """
    os.umask(0o077)
    logs.configure(config.logging.level, config.logging.format)
    for line in host_warnings(config):  # what check-config prints as a warning
        log.warning("config_warning", problem=line)
    notifier = Notifier()
    daemon = Daemon(config, gpu=gpu, notifier=notifier, runtime=runtime, config_path=config_path)
    try:
        asyncio.run(daemon.run())
    except HealthServerError as exc:
        log.error("agent_failed", error=str(exc))
        return 1
    except asyncio.CancelledError:
        log.warning("agent_cancelled")
    finally:
        notifier.close()
    return 1 if daemon.failure is not None else 0
