"""The owner of the control-plane link, so that ``reconnect`` can redial now.

:class:`Redialer` runs one :class:`~agent.connection.Connection` at a time. On
:meth:`Redialer.redial` it cancels that connection (which closes an open session with
1001, or cuts a backoff wait short) and dials a fresh one at once: a new connection's
first dial has no delay and its backoff starts from ``reconnect.initial_s``, which is
what an operator who asks to redial means.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Protocol

import structlog

from agent.loops import Interrupted, unless_set

log = structlog.get_logger(__name__)


class Runnable(Protocol):
    async def run(self) -> None: ...


class Redialer:
    """Run :meth:`run` as one task (it owns the connection task it starts; cancel it
    to disconnect). :meth:`redial` is safe to call at any time from the same loop."""

    def __init__(self, make: Callable[[], Runnable]) -> None:
        self._make = make
        self._requested = asyncio.Event()

    def redial(self) -> None:
        self._requested.set()

    async def run(self) -> None:
        """Never returns; raises what the connection raises (a bug: it retries itself)."""
        while True:
            self._requested.clear()
            # On a redial the connection is cancelled, which closes its session (1001),
            # and has ended before the next dial starts.
            with contextlib.suppress(Interrupted):
                await unless_set(self._requested, self._make().run())
            log.info("control_plane_redial", why="operator asked (cloudbender-agent reconnect)")
