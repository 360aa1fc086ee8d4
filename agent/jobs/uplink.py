"""The current control-plane session, for parts that outlive sessions (jobs, fetches).

The connection attaches the link after each ``welcome`` and detaches it when the
session ends. Senders never block on a dead link: :meth:`Uplink.send` returns False
when there is no session (the caller keeps what it needs, e.g. in the job store, and
sends again after the next ``welcome``). :meth:`wait_connected` lets a fetch wait for a
session instead of polling.
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog

from agent.connection import Link

log = structlog.get_logger(__name__)


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
        return await self._attempt(message, None)

    async def send_binary(self, header: dict[str, Any], payload: bytes | memoryview) -> bool:
        """Like :meth:`send`, for a binary frame."""
        return await self._attempt(header, payload)

    async def _attempt(self, message: dict[str, Any], payload: bytes | memoryview | None) -> bool:
        link = self._link
        if link is None:
            return False
        try:
            if payload is None:
                await link.send(message)
            else:
                await link.send_binary(message, payload)
                self.payload_bytes_sent += len(payload)
        except Exception as exc:  # the session ended under us; the caller resends later
            log.info("uplink_send_failed", type=message.get("type"), error=type(exc).__name__)
            return False
        return True
