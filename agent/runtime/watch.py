"""Watching the container engine: is it answering now, and when did it stop?

The daemon probes the engine every :data:`PROBE_INTERVAL_S` (``Runtime.info``, one
cheap version call) and hands each answer to :meth:`EngineWatch.observe`; a job runner
whose wait on its container fails because the engine does not answer reports that at
once (:meth:`EngineWatch.report_down`) rather than waiting for the next probe. The
watch logs ``engine_down`` and ``engine_up`` once per transition, never per probe, and
remembers its recent outages so that a job can ask whether the engine went away while
its container ran (:meth:`EngineWatch.outage_since`).

Thread-safe: runners report from their wait threads, the daemon probes from the event
loop, the health server reads from its own thread. One lock guards the state.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import structlog

from agent.runtime.base import Runtime, RuntimeInfo

log = structlog.get_logger(__name__)

PROBE_INTERVAL_S = 2.0
# A probe the engine has not answered within this long counts as "does not answer";
# the call itself goes on in its thread, and no second probe starts before it ends.
PROBE_TIMEOUT_S = 5.0
KEPT_OUTAGES = 32


@dataclass(frozen=True)
class Outage:
    """One time the engine stopped answering. ``began`` is the last time it was seen
    answering before (the outage began after it); ``ended`` is when it answered again,
    ``None`` while it lasts. Unix times."""

    began: float
    ended: float | None


class EngineWatch:
    """The engine's state as the agent last saw it. Starts "up" until told otherwise:
    the daemon's first probe runs at startup, before any job.

    ``publish`` gets every answer and every report of the engine going away, as a
    :class:`RuntimeInfo` (``/healthz``, ``/status`` and the metrics read it), so that a
    runner's report turns the node unhealthy at once, not at the next probe."""

    def __init__(
        self, docker_host: str, publish: Callable[[RuntimeInfo], None] | None = None
    ) -> None:
        self.docker_host = docker_host
        self._publish = publish
        self._lock = threading.Lock()
        self._up = threading.Event()
        self._up.set()
        self._last_seen_up = time.time()
        self._outages: deque[Outage] = deque(maxlen=KEPT_OUTAGES)
        self._error: str | None = None
        self._pending: asyncio.Future[RuntimeInfo] | None = None

    @property
    def up(self) -> bool:
        """Whether the engine answered the latest probe (and no runner saw it fail since)."""
        return self._up.is_set()

    @property
    def down_detail(self) -> str:
        """Why the engine counts as down, in words: "the Docker engine does not answer
        on unix:///var/run/docker.sock (…)". Meaningful only while :attr:`up` is false."""
        with self._lock:
            return self._error or f"the Docker engine does not answer on {self.docker_host}"

    def observe(self, info: RuntimeInfo, now: float | None = None) -> bool:
        """Record a probe's answer; log a transition once. Returns ``True`` when this
        answer brought the engine back (the caller then removes what was left behind)."""
        now = time.time() if now is None else now
        if not info.reachable:
            self.report_down(info.error or self.down_detail, now)
            return False
        if self._publish is not None:
            self._publish(info)
        with self._lock:
            self._last_seen_up = now
            if self._up.is_set():
                return False
            outage = self._outages.pop()
            self._outages.append(Outage(outage.began, now))
            self._error = None
            self._up.set()
        log.info(
            "engine_up",
            engine=self.docker_host,
            version=info.version,
            down_s=round(now - outage.began, 1),
        )
        return True

    def report_down(self, error: str, now: float | None = None) -> None:
        """The engine did not answer (a probe, or a runner's call). Idempotent while down:
        only the first report of an outage is logged."""
        now = time.time() if now is None else now
        if self._publish is not None:
            self._publish(RuntimeInfo("docker", None, False, False, error))
        with self._lock:
            self._error = error
            if not self._up.is_set():
                return
            self._up.clear()
            self._outages.append(Outage(self._last_seen_up, None))
        log.error("engine_down", engine=self.docker_host, error=error)

    def wait_up(self, timeout_s: float) -> bool:
        """Block the calling thread until the engine is up or ``timeout_s`` passes;
        whether it is up. For runner threads, never the event loop."""
        return self._up.wait(timeout_s)

    def outage_since(self, started: datetime | None) -> bool:
        """Whether the engine was down at some moment after ``started`` (a container's
        start, engine time; the engine runs on this host, so its clock is ours): an
        outage that still lasts, or one that ended after ``started``. With ``started``
        ``None``, only an outage that still lasts counts."""
        since = started.timestamp() if started is not None else None
        with self._lock:
            return any(
                o.ended is None or (since is not None and o.ended >= since) for o in self._outages
            )

    async def probe(self, runtime: Runtime) -> tuple[RuntimeInfo, bool]:
        """Ask the engine (``runtime.info`` in a thread, bounded by
        :data:`PROBE_TIMEOUT_S`) and :meth:`observe` the answer. Returns the info and
        whether the engine just came back. A probe still blocked from before is not
        doubled: it is awaited again, so a hung engine costs one thread, not one per probe.
        """
        if self._pending is None or self._pending.done():
            self._pending = asyncio.ensure_future(asyncio.to_thread(runtime.info))
        try:
            info = await asyncio.wait_for(asyncio.shield(self._pending), PROBE_TIMEOUT_S)
        except TimeoutError:
            info = RuntimeInfo(
                "docker",
                None,
                False,
                False,
                f"the Docker engine does not answer on {self.docker_host} "
                f"(no answer within {PROBE_TIMEOUT_S:g} s)",
            )
        return info, self.observe(info)
