"""The daemon's periodic owner loops, made to outlive their own failures.

A loop that samples the host, probes the engine, checks the state directory, pings the
watchdog or cleans up is not worth the whole daemon: one failed pass (``EMFILE`` from
psutil, a locked SQLite file, a surprise from NVML or the engine) must not stop the
node from running its jobs, and under systemd a crash is a restart that an attacker
can repeat at will. So each pass runs under :func:`guarded`: an ``Exception`` is
logged and the next pass runs on time.

``asyncio.CancelledError`` is a ``BaseException``, not an ``Exception``: it is never
caught here, and cancelling a loop still ends it. That is how the daemon stops them.

Logging is bounded: the first failure of each kind (exception type, plus the errno
name for an ``OSError``) in each loop is logged at once with its traceback; repeats of
that kind are logged at most once every :data:`REPEAT_LOG_S` seconds, with how many
were left out; the first pass that succeeds again logs ``loop_recovered``.
"""

from __future__ import annotations

import asyncio
import errno
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog

from agent import logs
from agent.errors import AgentError

log = structlog.get_logger(__name__)
T = TypeVar("T")

# A failure that repeats every 10 s (the sampler) would otherwise fill the journal.
REPEAT_LOG_S = 600.0


def failure_kind(exc: BaseException) -> str:
    """``"OSError[EMFILE]"``, ``"StoreError"``…: what makes two failures the same."""
    name = type(exc).__name__
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{name}[{errno.errorcode.get(exc.errno, exc.errno)}]"
    return name


class LoopFailures:
    """Logs the failures and recoveries of the daemon's loops, bounded per kind.

    One owner: the event loop's thread (every loop reports from there).
    """

    def __init__(
        self, repeat_log_s: float = REPEAT_LOG_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._throttle = logs.Throttle(limit=1, window_s=repeat_log_s, clock=clock)
        self._failing: dict[str, int] = {}

    def failed(self, loop: str, exc: Exception) -> None:
        """Record a failed pass of ``loop``; log it unless this kind was logged lately."""
        self._failing[loop] = self._failing.get(loop, 0) + 1
        kind = failure_kind(exc)
        left_out = self._throttle.admit(f"{loop}:{kind}")
        if left_out is None:
            return
        log.error(
            "loop_failed",
            loop=loop,
            kind=kind,
            error=str(exc) or kind,
            failures=self._failing[loop],
            repeats_not_logged=left_out,
            exc_info=exc,
        )

    def succeeded(self, loop: str) -> None:
        """Record a good pass of ``loop``; say so once if it had been failing."""
        failures = self._failing.pop(loop, 0)
        if failures:
            log.info("loop_recovered", loop=loop, failures=failures)

    def failing(self) -> dict[str, int]:
        """Loops whose last pass failed, with how many passes in a row failed."""
        return dict(self._failing)


async def guarded(loop: str, body: Callable[[], Awaitable[None]], failures: LoopFailures) -> None:
    """Run one pass of ``loop``. Never raises an ``Exception``; ``CancelledError`` passes."""
    try:
        await body()
    except Exception as exc:  # the point of this module; CancelledError is not caught
        failures.failed(loop, exc)
    else:
        failures.succeeded(loop)


async def every(
    loop: str,
    interval_s: float,
    body: Callable[[], Awaitable[None]],
    failures: LoopFailures,
    *,
    wait_first: bool,
) -> None:
    """Run ``body`` every ``interval_s`` seconds until cancelled, surviving its failures.

    With ``wait_first`` the first pass comes after one interval (the daemon's startup
    has just done it). Returns only by raising ``CancelledError``.
    """
    if wait_first:
        await asyncio.sleep(interval_s)
    while True:
        await guarded(loop, body, failures)
        await asyncio.sleep(interval_s)


RETRY_FIRST_S = 0.5
RETRY_MAX_S = 30.0


async def until_done(write: Callable[[], object], event: str, **fields: object) -> None:
    """Run the blocking ``write`` until it does not raise; log each failure as ``event``
    (with ``fields``) and back off from :data:`RETRY_FIRST_S` to :data:`RETRY_MAX_S`.

    For writes that must happen whatever the disk does (a job's end: a full disk once
    left a job unended for good). Never gives up: only cancelling it (a shutdown) ends
    the wait. Retries ``AgentError`` and ``OSError``; anything else is a bug and raises.
    """
    delay = RETRY_FIRST_S
    while True:
        try:
            write()
            return
        except (AgentError, OSError) as exc:
            log.error(event, error=str(exc), retry_in_s=delay, **fields)
        await asyncio.sleep(delay)
        delay = min(delay * 2, RETRY_MAX_S)


class Interrupted(Exception):
    """:func:`unless_set`: the event was set before the awaitable finished."""


async def unless_set(event: asyncio.Event, awaitable: Awaitable[T]) -> T:
    """Await ``awaitable`` unless ``event`` is set first: then cancel it and raise
    :class:`Interrupted`, once it has ended. Cancelling the caller cancels both;
    nothing is left running.

    The one shape of "race the work against a stop signal" (a job's cancel, a session's
    end, an operator's redial): an already-set event interrupts at once.
    """
    work = asyncio.ensure_future(awaitable)
    stop = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
        if not work.done():
            work.cancel()
            # Its clean-up (a session's close frame) ends before the caller goes on.
            await asyncio.wait({work})
    if work.done() and not work.cancelled():
        return work.result()
    # The work was cancelled: by us (the event won) or from outside.
    if not event.is_set():
        raise asyncio.CancelledError
    raise Interrupted
