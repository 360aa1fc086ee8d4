"""The daemon: wires the parts, owns every long-lived task, and climbs the signal ladder.

Lifecycle (after uvicorn's server): startup → main loop → one shutdown path.

- startup: prepare the state directory, take a first sample, start the health server,
  confirm it answers, then tell systemd ``READY=1``.
- main loop: every task runs in one ``asyncio.TaskGroup``, its single owner: the loop
  heartbeat, the sampler (GPUs, host), the state-directory check, the engine watch,
  the reload loop, the systemd watchdog, and once the job store is open, job recovery,
  the janitor, the operator's control socket (``agent.control``) and the control-plane
  link. A failed pass of a periodic loop is logged and the loop goes on
  (``agent.loops``): no sampler or probe error ends the daemon. A task that is not
  periodic (the link, recovery) and fails ends the group, and so the daemon, loudly.
- signals only set flags: the first SIGTERM/SIGINT asks to stop, a second one forces
  it, SIGHUP asks for a reload (``agent.reload``), which the reload loop performs.
- shutdown: ``STOPPING=1``, the group's tasks are cancelled and awaited, then the job
  system, the health server and NVML are closed. A task that does not end within
  :data:`SHUTDOWN_DEADLINE_S`, or a second signal, cancels the daemon at once.

Job containers are never children of this process, so stopping it leaves them running.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import resource
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import structlog

from agent import __version__, inventory, logs
from agent.config import Config, ControlPlaneConfig, load_config
from agent.connection import Connection
from agent.control.commands import Operator, serve_control
from agent.control.redial import Redialer
from agent.errors import AgentError, HealthServerError
from agent.gpu.base import GpuBackend
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
from agent.jobs.engine import reap_abandoned
from agent.jobs.setup import JobSystem, build_jobs
from agent.jobs.store import StoreError
from agent.loops import LoopFailures, every, guarded
from agent.reload import plan_reload
from agent.runtime.base import Runtime
from agent.runtime.watch import PROBE_INTERVAL_S, EngineWatch
from agent.sampling import NodeSampler
from agent.statedir import prepare_state_dir
from agent.systemd import Notifier, status_line

log = structlog.get_logger(__name__)

SHUTDOWN_DEADLINE_S = 10.0  # then the daemon is cancelled, whatever is still running
SAMPLE_INTERVAL_S = 10.0  # GPU and host telemetry; heartbeats (15 s) carry the latest
STATE_DIR_CHECK_S = 30.0
JANITOR_S = 600.0


class _Stopping(Exception):
    """Raised in the main loop's body to end the task group on a stop request."""


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
        # engine_down / engine_up; every answer (or a runner's report) lands in the facts
        self._engine = EngineWatch(config.runtime.docker_host, self.facts.set_runtime)
        if config.control_plane is not None:
            self.facts.control_plane = ControlPlaneFacts(configured=True, state="disconnected")
        # Set by signal handlers, and only by them (and by a task that fails).
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        self._reload_asked = asyncio.Event()
        self._signals = 0
        self._group: asyncio.TaskGroup | None = None
        self._failed: BaseException | None = None
        self._failures = LoopFailures()
        self._sampler = NodeSampler(
            self.facts, lambda: self.config, gpu, self._failures, self._resources_changed
        )
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
        c = self.config  # under limits.min_free_mib /healthz says why jobs are refused
        floor, max_down_s = c.limits.min_free_mib, c.health.max_disconnected_s
        return assess(self.facts, max_disconnected_s=max_down_s, min_free_mib=floor)

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
        loop.add_signal_handler(signal.SIGHUP, self._reload_asked.set)
        main = asyncio.current_task()
        assert main is not None
        deadline = asyncio.create_task(self._shutdown_deadline(main), name="shutdown-deadline")
        try:
            await self._startup()
            try:
                async with asyncio.TaskGroup() as group:
                    self._group = group
                    self._start_tasks()
                    await self._stop.wait()
                    raise _Stopping
            except* _Stopping:
                pass
            except* Exception as failed:
                # A dead one-off owner (the link, recovery) would leave a part silently
                # missing: stop loudly instead, and let systemd's Restart=on-failure
                # bring the agent back. (Periodic loops never raise: agent.loops.)
                self._failed = failed.exceptions[0]
                log.error("task_failed", error=repr(self._failed), exc_info=self._failed)
        finally:
            self._group = None
            await self._shutdown()
            deadline.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await deadline
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)

    def _start_tasks(self) -> None:
        self._spawn(self._heartbeat(), "loop-heartbeat")
        self._repeat("sampler", SAMPLE_INTERVAL_S, self._sampler.sample)
        state_dir = self.config.state_dir
        check = functools.partial(self._sampler.check_state_dir, state_dir)
        self._repeat("state-dir-check", STATE_DIR_CHECK_S, check)
        self._repeat("runtime-probe", PROBE_INTERVAL_S, self._probe_runtime)
        self._spawn(self._reload_loop(), "reload")
        self._spawn(self._jobs_and_link(), "jobs-and-control-plane")
        if self._notifier.watchdog_interval_s:
            interval = self._notifier.watchdog_interval_s
            self._repeat("watchdog", interval, self._watchdog_pass, wait_first=False)

    async def _startup(self) -> None:
        self._notifier.status("starting")
        self.facts.state_dir_problem = await asyncio.to_thread(
            prepare_state_dir, self.config.state_dir
        )
        await self._engine.probe(self._runtime)
        await self._sampler.sample()  # never raises: a node without host facts still starts
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
        """The one way out, whatever ended the main loop. The group's tasks are done."""
        self._stop.set()  # a failed startup or task: the deadline starts now too
        self._notifier.stopping("stopping")
        log.info("agent_stopping")
        if self._jobs is not None:
            await self._jobs.close()
        await asyncio.to_thread(self._health.stop)
        await asyncio.to_thread(self._gpu.close)
        log.info("agent_stopped")

    async def _shutdown_deadline(self, main: asyncio.Task[None]) -> None:
        await self._stop.wait()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._force.wait(), SHUTDOWN_DEADLINE_S)
        if not self._force.is_set():
            log.warning("stop_deadline_passed", deadline_s=SHUTDOWN_DEADLINE_S)
        main.cancel()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        assert self._group is not None, "tasks start only inside the main loop"
        self._group.create_task(coro, name=name)

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
            self._stop.set()
            self._force.set()

    async def _reload_loop(self) -> None:
        # One task for every SIGHUP there will be. A reload that fails in an unforeseen
        # way keeps the running config; it must not stop the daemon.
        while True:
            await self._reload_asked.wait()
            self._reload_asked.clear()
            await guarded("reload", self._reload, self._failures)

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
                    on_change=self._publish_jobs,
                )
            except StoreError as exc:
                log.error("job_store_unavailable", error=str(exc), retry_in_s=STATE_DIR_CHECK_S)
                await asyncio.sleep(STATE_DIR_CHECK_S)
        self._jobs.ctx.engine = self._engine
        self._publish_jobs()
        self._spawn(self._recover_jobs(self._jobs), "job-recovery")
        jobs = self._jobs
        self._repeat("janitor", JANITOR_S, lambda: self._janitor_pass(jobs), wait_first=False)
        cp = self.config.control_plane  # `reconnect` restarts the link (agent.control)
        link = Redialer(lambda: self._connection(cp)) if cp is not None else None
        operator = Operator(self.config.state_dir, jobs.manager, jobs.audit, self.facts, link)
        self._spawn(serve_control(self.config.control, operator), "control-socket")
        if link is not None:
            await link.run()

    async def _janitor_pass(self, jobs: JobSystem) -> None:
        # Delivered results are kept results.retention_h, then deleted; ended jobs are
        # remembered 7 days (or retention_h when longer), then forgotten.
        await jobs.janitor_pass(self.config.results.retention_h * 3600)

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
            handler=self._jobs.session,
            publish=publish,
            stats=self.facts.messages,
            user_agent=f"cloudbender-agent/{__version__}",
        )

    async def _probe_runtime(self) -> None:
        _, back = await self._engine.probe(self._runtime)
        if back and self._jobs is not None:  # what runners could not remove while it was down
            await reap_abandoned(self._runtime, self.config.node.id, self._jobs.manager.abandoned)

    async def _heartbeat(self) -> None:
        while True:
            self.facts.loop_tick = time.monotonic()
            await asyncio.sleep(LOOP_TICK_S)

    def _resources_changed(self) -> None:
        if self._jobs is not None:
            # A GPU may have come back: let jobs waiting for GPUs look again.
            self._jobs.ctx.resources_changed.fire()

    def _publish_jobs(self) -> None:
        if self._jobs is None:
            return  # a change while the job system is being built: published right after
        self.facts.jobs = tuple(self._jobs.manager.snapshot())
        self.facts.tally = self._jobs.manager.tally

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
        self.facts.pending_restart = plan.needs_restart  # `status` shows them
        logs.configure(self.config.logging.level, self.config.logging.format)
        self._sampler.reapply_gpu_allow()
        log.info(
            "config_reloaded",
            applied=list(plan.applied),
            needs_restart=list(plan.needs_restart),
        )

    def _status_line(self, problems: list[Problem] | None = None) -> str:
        return status_line(self.facts, self.problems() if problems is None else problems)
