"""The upgrade gate (docs/protocol.md §1): path, then ``Authorization: Bearer <token>``.

Runs as websockets' ``process_request``, before the subprotocol is negotiated: a
wrong path is 404, a missing or unknown token 401. The token never reaches a log,
a response or an exception text; not even websockets' DEBUG header dump (see
:data:`WS_LOGGER`).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Callable, Mapping
from http import HTTPStatus
from urllib.parse import urlsplit

import structlog
from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response

log = structlog.get_logger(__name__)

Tokens = Mapping[str, str] | Callable[[str], str | None]
ANY_NODE = "*"
# Bytes asked of the socket per read: one whole agent frame (1 MiB of payload, a header
# of at most 4 KiB and the framing) with room to spare.
READ_BYTES = 1024 * 1024 + 64 * 1024


class _RedactAuthorization(logging.Filter):
    """websockets logs request headers at DEBUG as ``("< %s: %s", name, value)``."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 2 and str(args[0]).lower() == "authorization":
            record.args = (args[0], "[redacted]")
        return True


# The logger handed to websockets for the server's connections.
WS_LOGGER = logging.getLogger("agent.controlplane.websockets")
WS_LOGGER.addFilter(_RedactAuthorization())


class AuthedConnection(ServerConnection):
    """A server connection that remembers what its upgrade's token allows, and reads
    its socket a whole agent frame at a time."""

    # The node_id the token may use ("*": any); set by Gate before the handler runs.
    allowed_node: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # asyncio reads a plain socket at most 256 KiB at a time (the transport's
        # ``max_size``). websockets appends each read to its buffer, which grows and
        # is copied several times before a 1 MiB chunk can be sliced out of it: for a
        # 1 GiB upload, reads of a whole frame cut this loop's CPU time by about a
        # sixth (docs/results.md, §6). A TLS transport has no such attribute and reads
        # its own way; it is left as it is.
        if isinstance(getattr(transport, "max_size", None), int):
            transport.max_size = READ_BYTES  # type: ignore[attr-defined]


class Gate:
    """``process_request`` for :func:`websockets.asyncio.server.serve`.

    ``tokens`` is read on every upgrade, never copied, so a caller may change it.
    The server must be created with ``create_connection=AuthedConnection``.
    """

    def __init__(self, tokens: Tokens, path: str) -> None:
        self.tokens = tokens
        self.path = path

    def allowed_node(self, token: str) -> str | None:
        """The node_id ``token`` may use, ``"*"`` for any, ``None`` if it is refused."""
        if callable(self.tokens):
            return self.tokens(token)
        found = None
        # Compare with every token, each in constant time: no early exit to time.
        for candidate, node_id in self.tokens.items():
            if hmac.compare_digest(candidate.encode(), token.encode()):
                found = node_id
        return found

    def __call__(self, conn: ServerConnection, request: Request) -> Response | None:
        if urlsplit(request.path).path != self.path:
            return conn.respond(HTTPStatus.NOT_FOUND, "Not found.\n")
        values = request.headers.get_all("Authorization")
        scheme, _, token = (values[0] if len(values) == 1 else "").partition(" ")
        token = token.strip()
        allowed = self.allowed_node(token) if scheme.lower() == "bearer" and token else None
        if allowed is None:
            # Say why in the log, never with the token.
            why = "unknown token" if token else "no bearer token"
            log.warning("cp.auth_refused", peer=str(conn.remote_address), why=why)
            response = conn.respond(HTTPStatus.UNAUTHORIZED, "Unauthorized.\n")
            response.headers["WWW-Authenticate"] = "Bearer"
            return response
        assert isinstance(conn, AuthedConnection)
        conn.allowed_node = allowed
        return None
