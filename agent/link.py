"""The session as the parts that outlive sessions see it: no sockets, no websockets.

:class:`Link` is what a handler may do with an established session,
:class:`SessionHandler` what the connection calls with what the control plane says
(``agent.dispatch.Dispatcher`` is the agent's one), and :class:`Uplink` the current
session for parts that outlive sessions (jobs, result uploads, model fetches).
``agent.connection`` implements and calls these; jobs/, results/ and models/ import them
from here, never the connection.

The connection attaches the link after each ``welcome`` and detaches it when the
session ends. Senders never block on a dead link: :meth:`Uplink.send` returns False
when there is no session (the caller keeps what it needs, e.g. in the job store, and
sends again after the next ``welcome``). :meth:`Uplink.wait_connected` lets a fetch or
an upload wait for a session instead of polling.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

import structlog

from agent.protocol import messages
from agent.protocol.session import PeerError

log = structlog.get_logger(__name__)


class Link(Protocol):
    """What a handler may do with the established session."""

    async def send(self, message: dict[str, Any]) -> None: ...

    async def send_frame(self, type_: str, frame: bytes | memoryview) -> None:
        """Send a binary frame built by :class:`~agent.protocol.frames.FrameBuffer`
        (header type ``type_``). Returns once ``frame`` is no longer needed."""
        ...


class SessionHandler(Protocol):
    """The application side (jobs, results, artifacts) of a session.

    Callbacks run on the receive path: they must return quickly and leave long work to
    tasks of their own, or the session stops reading (and keepalive pongs are delayed).
    An exception from a callback ends the session (logged, close 1011, reconnect).
    """

    def hello_jobs(self) -> list[dict[str, str]]: ...

    async def on_established(self, link: Link) -> None: ...

    async def on_message(self, link: Link, message: messages.Incoming) -> None: ...

    async def on_invalid_assignment(self, link: Link, job_id: str, detail: str) -> None: ...

    async def on_peer_error(self, link: Link, error: PeerError) -> None: ...

    def on_closed(self) -> None: ...


class Uplink:
    def __init__(self) -> None:
        self._link: Link | None = None
        self._connected = asyncio.Event()
        self._disconnected = asyncio.Event()
        self._disconnected.set()
        # Increases with every session, so a waiter can tell a new session from the old.
        self.generation = 0
        # Binary payload bytes handed to a session (result chunks, resends included).
        self.payload_bytes_sent = 0

    @property
    def connected(self) -> bool:
        return self._link is not None

    def attach(self, link: Link) -> None:
        self._link = link
        self.generation += 1
        self._disconnected.clear()
        self._connected.set()

    def detach(self) -> None:
        self._link = None
        self._connected.clear()
        self._disconnected.set()

    async def wait_disconnected(self) -> None:
        """Return when the current session (if any) has ended."""
        await self._disconnected.wait()

    async def wait_connected(self) -> int:
        """Wait for an established session; return its generation."""
        await self._connected.wait()
        return self.generation

    async def send(self, message: dict[str, Any]) -> bool:
        """Send on the current session. False (nothing sent) when there is none or it dies."""
        link = self._link
        if link is None:
            return False
        try:
            await link.send(message)
        except Exception as exc:  # the session ended under us; the caller resends later
            log.info("uplink_send_failed", type=message.get("type"), error=type(exc).__name__)
            return False
        return True

    async def send_frame(self, type_: str, frame: bytes | memoryview, payload_bytes: int) -> bool:
        """Like :meth:`send`, for a built binary frame that carries ``payload_bytes``;
        once it returns, ``frame``'s buffer may be reused."""
        link = self._link
        if link is None:
            return False
        try:
            await link.send_frame(type_, frame)
        except Exception as exc:  # the session ended under us; the caller resends later
            log.info("uplink_send_failed", type=type_, error=type(exc).__name__)
            return False
        self.payload_bytes_sent += payload_bytes
        return True
