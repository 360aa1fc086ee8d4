"""One agent connection on the CP side: the ``hello`` gate, then the receive loop.

:func:`read_hello` owns the first frame (§3.1): anything but a valid ``hello`` in a
protocol this CP speaks is answered with ``error`` and the connection is closed.
:class:`AgentSession` then runs until the connection closes, feeding each frame to
:func:`agent.controlplane.handlers.dispatch` in arrival order.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Collection
from typing import Any

import structlog
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from agent.controlplane import handlers, validate
from agent.controlplane.artifacts import ArtifactStore
from agent.controlplane.handlers import BadFrame, error
from agent.controlplane.results import ResultStore
from agent.controlplane.state import Disconnect, Registry

log = structlog.get_logger(__name__)

# Close code for a connection whose first frame is not an acceptable hello
# (RFC 6455 "policy violation"). docs/protocol.md names only 4401 and 4409.
CLOSE_BAD_HELLO = 1008


async def read_hello(
    conn: ServerConnection, versions: Collection[int], within_s: float
) -> dict[str, Any] | None:
    """Receive and check the first frame. ``None`` means it was refused and closed.

    A hello whose ``protocol`` is not in ``versions`` gets ``unsupported_protocol``
    before its other fields are looked at: a newer agent's hello may differ.
    """
    try:
        try:
            async with asyncio.timeout(within_s):
                data = await conn.recv()
        except TimeoutError:
            log.warning("cp.no_hello", peer=_peer(conn), timeout_s=within_s)
            await conn.close(CLOSE_BAD_HELLO, "no hello")
            return None
        hello, reply = _check_hello(data, versions)
        if reply is None:
            return hello
        log.warning(
            "cp.hello_refused", peer=_peer(conn), code=reply["code"], detail=reply["detail"]
        )
        await conn.send(json.dumps(reply))
        reason = "unsupported protocol" if reply["code"] == "unsupported_protocol" else "bad hello"
        await conn.close(CLOSE_BAD_HELLO, reason)
        return None
    except ConnectionClosed:
        return None


def _check_hello(
    data: str | bytes, versions: Collection[int]
) -> tuple[dict[str, Any], None] | tuple[None, dict[str, Any]]:
    """``(hello, None)``, or ``(None, error reply)``."""
    if isinstance(data, bytes):
        return None, error("bad_message", "the first message must be hello, not a binary frame")
    try:
        message = handlers.parse_text(data)
    except BadFrame as bad:
        return None, bad.reply
    if message["type"] != "hello":
        return None, error("bad_message", "the first message must be hello", message["type"])
    protocol = message.get("protocol")
    if not validate.is_kind(protocol, "int"):
        return None, error("bad_message", "field 'protocol' must be an int", "hello")
    if protocol not in versions:
        spoken = ", ".join(str(v) for v in sorted(versions))
        detail = f"protocol {protocol} is not spoken here (speaks {spoken})"
        return None, error("unsupported_protocol", detail, "hello")
    problem = validate.problem(message, validate.AGENT_MESSAGES["hello"])
    if problem is None and not message["node_id"]:
        problem = "field 'node_id' is empty"
    return (message, None) if problem is None else (None, error("bad_message", problem, "hello"))


def _peer(conn: ServerConnection) -> str:
    try:
        host, port = conn.remote_address[:2]
    except (TypeError, ValueError, OSError):
        return "?"
    return f"{host}:{port}"


class AgentSession:
    """A welcomed connection: the :class:`~agent.controlplane.handlers.Context` of its handlers.

    Created after ``hello`` passed every check; :meth:`run` sends ``welcome`` and
    returns when the connection is closed, by either side, after recording how.
    """

    def __init__(
        self,
        conn: ServerConnection,
        registry: Registry,
        hello: dict[str, Any],
        heartbeat_s: float,
        artifacts: ArtifactStore,
        results: ResultStore,
        *,
        auto_ack: bool = False,
    ) -> None:
        self.conn = conn
        self.registry = registry
        self.artifacts = artifacts
        self.results = results
        self.auto_ack = auto_ack
        self.aborted = False
        self.node_id: str = hello["node_id"]
        self.session_id = "s-" + secrets.token_hex(8)
        self.next_seq = 1
        self.hello = hello
        self.heartbeat_s = heartbeat_s
        self.done = asyncio.Event()

    async def send(self, message: dict[str, Any]) -> None:
        await self.conn.send(json.dumps(message, separators=(",", ":")))
        self.registry.sent(self.node_id, message)

    async def send_raw(self, data: str | bytes) -> None:
        await self.conn.send(data)

    async def drop(self) -> None:
        await self.conn.close(1001, "artifact fault: connection dropped")

    async def abort(self) -> None:
        # Frames already received stay queued in websockets and would still be read;
        # a network failure would have lost them: the receive loop skips them.
        self.aborted = True
        self.conn.transport.abort()

    async def run(self) -> None:
        """Record the session, welcome the agent, serve frames until the connection ends.

        The caller must have registered the session as the node's live one first.
        """
        self.registry.opened(self.node_id, self.session_id, self.hello)
        self.registry.received(self.node_id, self.session_id, "hello", self.hello)
        for text in validate.violations("hello", self.hello, validate.AGENT_MESSAGES["hello"]):
            self.registry.violation(self.node_id, text)
        log.info("cp.session_open", node_id=self.node_id, session=self.session_id)
        try:
            await self.send(
                {"type": "welcome", "session": self.session_id, "heartbeat_s": self.heartbeat_s}
            )
            async for data in self.conn:
                if not self.aborted:
                    await self._one(data)
        except ConnectionClosed:
            pass
        finally:
            await self.conn.wait_closed()
            self._record_close()
            self.done.set()

    async def _one(self, data: str | bytes) -> None:
        try:
            await handlers.dispatch(self, data)
        except ConnectionClosed:
            raise
        except Exception:
            # A bug in the CP must not end the session: the agent would only retry.
            log.exception("cp.handler_failed", node_id=self.node_id, session=self.session_id)
            await self.send(error("internal", "the control plane failed on this message"))

    def _record_close(self) -> None:
        protocol = self.conn.protocol
        rcvd, sent = protocol.close_rcvd, protocol.close_sent
        if rcvd is not None and (sent is None or protocol.close_rcvd_then_sent):
            code, reason, by = int(rcvd.code), rcvd.reason, "agent"
        elif sent is not None:
            code, reason, by = int(sent.code), sent.reason, "cp"
        else:
            code, reason, by = None, "connection lost", "network"
        self.registry.closed(
            self.node_id, Disconnect(self.session_id, code, reason, by, time.time())
        )
        log.info(
            "cp.session_closed", node_id=self.node_id, session=self.session_id, code=code, by=by
        )
