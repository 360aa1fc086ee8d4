"""The WebSocket server of the reference control plane, and its asyncio API.

The upgrade is checked by :class:`~agent.controlplane.auth.Gate` (path, then bearer
token); the subprotocol is negotiated by websockets; each accepted connection is
handed to :func:`~agent.controlplane.session.read_hello` and, once welcomed, to an
:class:`~agent.controlplane.session.AgentSession`. One live session per ``node_id``:
a newer connection replaces the older, which is closed with 4409.
"""

from __future__ import annotations

import asyncio
import ssl as ssl_module
import tempfile
from collections.abc import Collection
from pathlib import Path
from types import TracebackType
from typing import Any

import structlog
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from agent.controlplane.api import ControlPlaneAPI
from agent.controlplane.artifacts import ArtifactStore, Fault
from agent.controlplane.auth import ANY_NODE, WS_LOGGER, AuthedConnection, Gate, Tokens
from agent.controlplane.errors import NodeNotConnected
from agent.controlplane.mtls import (
    PresentedCert,
    node_refusal,
    presented_cert,
    requires_client_cert,
)
from agent.controlplane.results import ResultStore
from agent.controlplane.session import AgentSession, read_hello
from agent.controlplane.state import Registry
from agent.heap import keep_freed_blocks
from agent.protocol import (
    MAX_CHUNK_PAYLOAD,
    MAX_HEADER,
    MAX_INCOMING_FRAME,
    PROTOCOL_VERSION,
    SUBPROTOCOL,
)

log = structlog.get_logger(__name__)

CLOSE_AUTH = 4401
CLOSE_REPLACED = 4409


class ControlPlane(ControlPlaneAPI):
    """The reference control plane: a real WebSocket server for docs/protocol.md, asyncio API.

    ``tokens`` maps each bearer token to the ``node_id`` it may use (``"*"``: any), or
    is a function ``token -> node_id | None``; it is consulted on every upgrade, so a
    test may change it while the server runs. ``port=0`` picks a free port once; after
    that the same port is used by every :meth:`start`, so a restarted CP is found by
    agents at the same URL. Recorded state survives :meth:`stop`.

    Test options: ``protocol_versions`` (the ``hello.protocol`` values spoken),
    ``select_subprotocol=False`` (accept without selecting ``cloudbender-agent.v1``,
    so that the agent's refusal can be tested), ``heartbeat_s`` (sent in ``welcome``).

    TLS: ``ssl`` serves ``wss://``; one from :func:`~agent.controlplane.mtls.server_context`
    with ``client_ca`` requires client certificates and binds each to the node id in
    its CN (refused with 4401 otherwise); :attr:`client_certs` records those accepted.

    Results (§5) are stored under ``results_dir`` (default: a temporary directory that
    lives as long as this object); a CP built on the directory of an earlier one
    resumes its uploads. ``auto_ack=True``: every terminal ``job.state`` is answered
    ``job.ack`` once recorded.
    """

    def __init__(
        self,
        tokens: Tokens,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        heartbeat_s: float = 15,
        protocol_versions: Collection[int] = frozenset({PROTOCOL_VERSION}),
        select_subprotocol: bool = True,
        path: str = "/agent/v1",
        hello_timeout_s: float = 10.0,
        close_timeout_s: float = 5.0,
        ping_interval_s: float | None = 20.0,
        ssl: ssl_module.SSLContext | None = None,
        results_dir: Path | None = None,
        auto_ack: bool = False,
    ) -> None:
        self._gate = Gate(tokens, path)
        self.host = host
        self._port = port
        self.heartbeat_s = heartbeat_s
        self.protocol_versions = frozenset(protocol_versions)
        self._select_subprotocol = select_subprotocol
        self.path = path
        self._hello_timeout_s = hello_timeout_s
        self._close_timeout_s = close_timeout_s
        self._ping_interval_s = ping_interval_s
        self._ssl = ssl
        self.registry = Registry()
        self.artifacts = ArtifactStore()
        self._results_tmp: tempfile.TemporaryDirectory[str] | None = None
        if results_dir is None:
            self._results_tmp = tempfile.TemporaryDirectory(prefix="cp-results-")
            results_dir = Path(self._results_tmp.name)
        self.results = ResultStore(Path(results_dir), self.registry)
        self.auto_ack = auto_ack
        self._server: Server | None = None
        self._live: dict[str, AgentSession] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # Each client certificate accepted at a hello, per node, oldest first (mtls.py).
        self.client_certs: dict[str, list[PresentedCert]] = {}

    # -- lifecycle --------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The listening port; 0 until the first :meth:`start` when built with ``port=0``."""
        return self._port

    @property
    def url(self) -> str:
        """``ws://HOST:PORT/agent/v1`` (``wss://`` with ``ssl``), for the agent's config."""
        scheme = "wss" if self._ssl is not None else "ws"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self._port}{self.path}"

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def results_dir(self) -> Path:
        """Where results are stored: ``<results_dir>/<node_id>/<job_id>/<path>`` once accepted."""
        return self.results.root

    async def start(self) -> None:
        """Listen. Idempotent. Raises ``OSError`` when the port cannot be bound."""
        if self._server is not None:
            return
        # Each received MiB passes through a few short-lived blocks (the socket's reads,
        # a whole frame each: see AuthedConnection; websockets' frame buffer and unmasked
        # copy): keep them for reuse rather than faulting fresh pages in for each
        # (agent/heap.py).
        keep_freed_blocks()
        self._server = await serve(
            self._handle,
            self.host,
            self._port,
            subprotocols=[Subprotocol(SUBPROTOCOL)] if self._select_subprotocol else None,
            process_request=self._gate,
            create_connection=AuthedConnection,
            # 16 MiB of payload plus a header and its length prefix (§2, §6).
            max_size=MAX_INCOMING_FRAME + MAX_HEADER + 4,
            ping_interval=self._ping_interval_s,
            ping_timeout=self._ping_interval_s,
            close_timeout=self._close_timeout_s,
            logger=WS_LOGGER,
            ssl=self._ssl,
            reuse_address=True,
        )
        self._port = int(self._server.sockets[0].getsockname()[1])
        log.info("cp.listening", url=self.url)

    async def stop(self) -> None:
        """Close every connection with 1001, stop listening, free the port. Idempotent."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close(code=1001, reason="control plane stopping")
        await server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.results.close()
        log.info("cp.stopped", url=self.url)

    async def __aenter__(self) -> ControlPlane:
        await self.start()
        return self

    async def __aexit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        await self.stop()

    # -- upgrade and sessions -----------------------------------------------------------

    async def _handle(self, conn: ServerConnection) -> None:
        assert isinstance(conn, AuthedConnection)
        hello = await read_hello(conn, self.protocol_versions, self._hello_timeout_s)
        if hello is None:
            return
        node_id = hello["node_id"]
        if conn.allowed_node not in (ANY_NODE, node_id):
            log.warning("cp.node_refused", node_id=node_id)
            await conn.close(CLOSE_AUTH, "node_id not allowed for this token")
            return
        if requires_client_cert(self._ssl):
            cert = presented_cert(conn.transport.get_extra_info("peercert"))
            refusal = node_refusal(cert, node_id)
            if refusal is not None:
                log.warning("cp.client_cert_refused", node_id=node_id, reason=refusal)
                await conn.close(CLOSE_AUTH, refusal)
                return
            assert cert is not None
            self.client_certs.setdefault(node_id, []).append(cert)
        session = AgentSession(
            conn,
            self.registry,
            hello,
            self.heartbeat_s,
            self.artifacts,
            self.results,
            auto_ack=self.auto_ack,
        )
        old = self._live.get(node_id)
        self._live[node_id] = session
        if old is not None:
            log.info("cp.session_replaced", node_id=node_id, old=old.session_id)
            # In the background: the old connection may be half-open, and closing it
            # could take close_timeout_s; the new agent gets its welcome at once.
            self._spawn(old.conn.close(CLOSE_REPLACED, "replaced"))
        try:
            await session.run()
        finally:
            if self._live.get(node_id) is session:
                del self._live[node_id]

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- sending, for tests, the demo and provider engineers ----------------------------
    # (reading, waiting, jobs and results: ControlPlaneAPI, in api.py)

    def _session(self, node_id: str) -> AgentSession:
        session = self._live.get(node_id)
        if session is None:
            raise NodeNotConnected(f"{node_id} has no live session")
        return session

    async def send(self, node_id: str, message: dict[str, Any]) -> None:
        """Send one JSON text message. Raises ``NodeNotConnected``."""
        try:
            await self._session(node_id).send(message)
        except ConnectionClosed as exc:
            raise NodeNotConnected(f"{node_id} disconnected while sending") from exc

    async def send_raw(self, node_id: str, data: str | bytes) -> None:
        """Send a text (``str``) or binary (``bytes``) frame as given, for fuzzing."""
        try:
            await self._session(node_id).send_raw(data)
        except ConnectionClosed as exc:
            raise NodeNotConnected(f"{node_id} disconnected while sending") from exc
        self.registry.sent_raw(node_id, data)

    async def add_artifact(
        self, artifact_id: str, data: bytes, *, chunk_bytes: int = MAX_CHUNK_PAYLOAD
    ) -> str:
        """Serve ``data`` as ``artifact_id`` (§6), in chunks of ``chunk_bytes``; its sha256."""
        return self.artifacts.add(artifact_id, data, chunk_bytes)

    async def artifact_fault(
        self,
        artifact_id: str,
        *,
        drop_after_bytes: int | None = None,
        end_sha256: str | None = None,
        end_size: int | None = None,
    ) -> None:
        """Arm test faults on ``artifact_id``, replacing earlier ones (see ``artifacts``).

        ``drop_after_bytes``: close the connection after that many bytes, once.
        ``end_sha256`` / ``end_size``: what ``artifact.end`` says instead of the truth.
        """
        self.artifacts.set_fault(artifact_id, Fault(drop_after_bytes, end_sha256, end_size))

    async def close_node(self, node_id: str, code: int = 1000, reason: str = "") -> None:
        """Close ``node_id``'s session with ``code`` and wait until its end is recorded."""
        session = self._session(node_id)
        await session.conn.close(code, reason)
        await session.done.wait()

    async def disconnect_all(self, code: int = 1001, reason: str = "disconnect") -> None:
        """Close every live session, keep listening (agents may reconnect)."""
        sessions = list(self._live.values())
        await asyncio.gather(*(s.conn.close(code, reason) for s in sessions))
        await asyncio.gather(*(s.done.wait() for s in sessions))
