"""The owner of the control-plane link, so that ``reconnect`` can redial now.

:class:`Redialer` runs one :class:`~agent.connection.Connection` at a time. On
:meth:`Redialer.redial` it cancels that connection (which closes an open session with
1001, or cuts a backoff wait short) and dials a fresh one at once: a new connection's
first dial has no delay and its backoff starts from ``reconnect.initial_s``, which is
what an operator who asks to redial means.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

import structlog

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
            link = asyncio.create_task(self._make().run(), name="control-plane-link")
            asked = asyncio.create_task(self._requested.wait(), name="redial-request")
            try:
                await asyncio.wait({link, asked}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                link.cancel()
                asked.cancel()
                # The connection closes its session (1001) before the next dial starts.
                # asyncio.wait: their CancelledError is not ours, a cancel of ours is.
                await asyncio.wait({link, asked})
            if not link.cancelled() and (failure := link.exception()) is not None:
                raise failure
            log.info("control_plane_redial", why="operator asked (cloudbender-agent reconnect)")
