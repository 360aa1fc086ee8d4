"""The daemon: wires the parts, owns every long-lived task, and climbs the signal ladder.

Lifecycle (after uvicorn's server): startup → main loop → shutdown.

- startup: prepare the state directory, take a first sample, start the health server,
  confirm it answers, then tell systemd ``READY=1``.
- main loop: independent tasks, one owner each (this class): the loop heartbeat, the
  sampler (GPUs, host), the state-directory check and the systemd watchdog.
- shutdown: the first SIGTERM/SIGINT sets a flag; the daemon says ``STOPPING=1``,
  cancels its tasks, stops the health server and returns. A second signal cancels at
  once. SIGHUP reloads what can be reloaded (``agent.reload``).

Job containers are never children of this process, so stopping it leaves them running.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
import urllib.request
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import structlog

from agent import __version__, inventory, logs
from agent.config import Config, ControlPlaneConfig, load_config
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
from agent.health.server import LOOPBACK_HTTP, Endpoints, HealthServer
from agent.health.status import status_document
from agent.hostinfo import HostSampler
from agent.jobs.setup import JobSystem, build_jobs
from agent.jobs.store import StoreError
from agent.reload import plan_reload
from agent.runtime.base import Runtime
from agent.statedir import check_state_dir, prepare_state_dir
from agent.systemd import Notifier

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
            self._spawn(self._sampler(), "sampler")
            self._spawn(self._state_dir_checker(), "state-dir-check")
            self._spawn(self._runtime_prober(), "runtime-probe")
            self._spawn(self._jobs_and_link(), "jobs-and-control-plane")
            if self._notifier.watchdog_interval_s:
                self._spawn(self._watchdog(self._notifier.watchdog_interval_s), "watchdog")
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
        await self._sample_once()
        self._health.start()
        host, port = self._health.address
        if not await asyncio.to_thread(_answers, host, port):
            raise HealthServerError(f"health server on {host}:{port} does not answer")
        log.info(
            "agent_started",
            node_id=self.config.node.id,
            version=__version__,
            health=f"{host}:{port}",
            gpus=len(self.facts.gpus.gpus) if self.facts.gpus else 0,
            control_plane=self.facts.control_plane.state,
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

    def _on_task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            # A dead owner loop would leave a part silently missing: stop loudly instead,
            # and let systemd's Restart=on-failure bring the agent back.
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
        self._spawn(self._reload(), "reload")

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
        self._spawn(self._janitor(self._jobs), "janitor")
        if self.config.control_plane is not None:
            await self._connection(self.config.control_plane).run()

    async def _janitor(self, jobs: JobSystem) -> None:
        # Delivered results are kept results.retention_h, then deleted; ended jobs are
        # remembered 7 days for duplicate_job, then forgotten.
        while True:
            retention_s = self.config.results.retention_h * 3600
            gone = await asyncio.to_thread(jobs.ctx.results.spool.purge_delivered, retention_s)
            if gone:
                log.info("delivered_results_deleted", jobs=gone)
            jobs.store.forget_old()
            await asyncio.sleep(JANITOR_S)

    async def _recover_jobs(self, jobs: JobSystem) -> None:
        # Until the engine answers, nothing can be said about the containers: wait for
        # it rather than declare running jobs lost.
        while True:
            try:
                containers = await asyncio.to_thread(self._runtime.list_jobs, self.config.node.id)
                break
            except AgentError as exc:
                log.error("job_recovery_waiting_for_engine", error=str(exc), retry_in_s=10)
                await asyncio.sleep(10)
        await jobs.manager.recover(containers)

    def _connection(self, cp: ControlPlaneConfig) -> Connection:
        def publish(facts: ControlPlaneFacts) -> None:
            self.facts.control_plane = facts

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

    async def _runtime_prober(self) -> None:
        while True:
            await asyncio.sleep(RUNTIME_PROBE_S)
            self.facts.runtime = await asyncio.to_thread(self._runtime.info)

    async def _heartbeat(self) -> None:
        while True:
            self.facts.loop_tick = time.monotonic()
            await asyncio.sleep(LOOP_TICK_S)

    async def _sampler(self) -> None:
        while True:
            await asyncio.sleep(SAMPLE_INTERVAL_S)
            await self._sample_once()

    async def _sample_once(self) -> None:
        inventory: GpuInventory = await asyncio.to_thread(self._gpu.snapshot)
        self.facts.gpus = mark_allocatable(inventory, self.config.gpus.allow)
        self.facts.host = await asyncio.to_thread(self._host_sampler.sample)
        if self._jobs is not None:
            # A GPU may have come back: let jobs waiting for GPUs look again.
            self._jobs.ctx.resources_changed.fire()

    def _publish_jobs(self) -> None:
        assert self._jobs is not None
        self.facts.jobs = tuple(self._jobs.manager.snapshot())
        self.facts.jobs_ended = dict(self._jobs.manager.ended)

    async def _state_dir_checker(self) -> None:
        while True:
            await asyncio.sleep(STATE_DIR_CHECK_S)
            problem = await asyncio.to_thread(check_state_dir, self.config.state_dir)
            if problem != self.facts.state_dir_problem:
                if problem is None:
                    log.info("state_dir_ok")
                else:
                    log.warning("state_dir_problem", detail=problem.detail)
            self.facts.state_dir_problem = problem

    async def _watchdog(self, interval_s: float) -> None:
        while True:
            problems = self.problems()
            if watchdog_ok(problems):
                self._notifier.watchdog()
            self._notifier.status(self._status_line(problems))
            await asyncio.sleep(interval_s)

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
        problems = self.problems() if problems is None else problems
        gpus = len(self.facts.gpus.gpus) if self.facts.gpus else 0
        health = "healthy" if not problems else f"unhealthy: {problems[0].detail}"
        return f"{health}; control plane {self.facts.control_plane.state}; {gpus} GPU(s)"


def _answers(host: str, port: int) -> bool:
    # READY=1 must mean "the health server answers", not merely "a socket is bound".
    netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        with LOOPBACK_HTTP.open(f"http://{netloc}/healthz", timeout=5) as response:
            return int(response.status) in (200, 503)
    except urllib.error.HTTPError as exc:
        return exc.code == 503
    except (TimeoutError, OSError):
        return False


def serve(
    config: Config,
    *,
    gpu: GpuBackend,
    runtime: Runtime,
    config_path: Path | None = None,
) -> int:
    """Configure logging, run the daemon to completion, return the process exit status."""
    logs.configure(config.logging.level, config.logging.format)
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
