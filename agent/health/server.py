"""The loopback health server: ``/healthz``, ``/status``, ``/metrics``. Read-only.

It runs the standard library's threading HTTP server in its own thread, apart from the
daemon's event loop, on purpose: when the loop hangs, ``/healthz`` still answers and
says so (the loop's heartbeat goes stale) instead of timing out with no explanation.
Handlers only read immutable snapshots, so they never block the loop.

Any local user can connect to the port, so no client may hold more than bounded
resources: a user opening 1,100 idle connections must not exhaust the agent's
descriptors (which would fail everything else the agent opens):

- each request must arrive whole within ``request_timeout_s`` of the moment the server
  starts waiting for it (the connection's start, or the previous response on a
  keep-alive connection). The deadline covers the whole request, not each read, so a
  client that trickles a byte a second is dropped as surely as one that sends nothing;
- at most ``max_connections`` connections are served at once, each by one thread; a
  connection over the cap is closed as soon as it is accepted, never kept waiting in
  the process. Connections not yet accepted wait in the kernel's listen backlog
  (:data:`LISTEN_BACKLOG`), which costs the agent no descriptor.

So the server never holds more than ``max_connections`` descriptors and threads,
whatever clients do, and an idle connection is freed within ``request_timeout_s``.
While an attacker keeps every slot busy, other clients are refused too: the cap
protects the agent, not the endpoint.
"""

from __future__ import annotations

import errno
import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import structlog

from agent import logs
from agent.errors import HealthServerError
from agent.health.facts import Problem

log = structlog.get_logger(__name__)

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Clients of the health server (the readiness self-check, the status command) ignore
# HTTP_PROXY: a proxy would reach its own loopback, not this machine's.
LOOPBACK_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))

# A local client (curl, the status command, Prometheus) sends its request in one go:
# a few seconds is generous, and bounds how long an idle connection holds a descriptor.
REQUEST_TIMEOUT_S = 5.0
# Far above what the status command and a scraper need at once, far below any
# descriptor limit: the agent also needs descriptors for jobs, results and the store.
MAX_CONNECTIONS = 32
# Connections waiting to be accepted live in the kernel and cost no descriptor; the
# server accepts (and over the cap closes) them quickly, so a short queue suffices.
LISTEN_BACKLOG = 16
# accept() fails with these while the process (or the system) is out of descriptors or
# memory, for reasons outside this server.
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_ACCEPT_BACKOFF_S = 0.1


@dataclass(frozen=True)
class Endpoints:
    """What the server serves; each callable must be thread-safe and quick."""

    problems: Callable[[], list[Problem]]
    status: Callable[[], dict[str, Any]]
    metrics: Callable[[], bytes]


class _DeadlineReader(io.RawIOBase):
    """A socket's reading side where every read ends by the handler's request deadline.

    ``BaseHTTPRequestHandler`` turns the ``TimeoutError`` raised past the deadline into
    closing the connection.
    """

    def __init__(self, sock: socket.socket, handler: _Handler) -> None:
        self._sock = sock
        self._handler = handler

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self._handler.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request did not arrive in time")
        self._sock.settimeout(left)
        return self._sock.recv_into(buffer)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = "cloudbender-agent"
    sys_version = ""
    deadline = 0.0

    def setup(self) -> None:
        super().setup()
        # Replaces the plain socket file: its timeout would restart with every byte.
        self.rfile.close()
        self.rfile = io.BufferedReader(_DeadlineReader(self.connection, self))

    def handle_one_request(self) -> None:
        self.deadline = time.monotonic() + self.server.request_timeout_s
        super().handle_one_request()

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        endpoints = self.server.endpoints
        try:
            if path == "/healthz":
                problems = endpoints.problems()
                body = {"healthy": not problems, "problems": [p.to_dict() for p in problems]}
                code = HTTPStatus.SERVICE_UNAVAILABLE if problems else HTTPStatus.OK
                self._send_json(code, body)
            elif path == "/status":
                self._send_json(HTTPStatus.OK, endpoints.status())
            elif path == "/metrics":
                self._send(HTTPStatus.OK, endpoints.metrics(), PROMETHEUS_CONTENT_TYPE)
            else:
                self._send_json(HTTPStatus.NOT_FOUND, {"error": "not found"})
        except Exception:
            log.exception("health_request_failed", path=path)
            self._send_json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error"})

    def do_HEAD(self) -> None:
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, b"", "text/plain", allow=True)

    def _refuse(self) -> None:
        self._send_json(HTTPStatus.METHOD_NOT_ALLOWED, {"error": "read-only: use GET"})

    do_POST = do_PUT = do_DELETE = do_PATCH = _refuse

    def _send_json(self, code: HTTPStatus, body: dict[str, Any]) -> None:
        payload = json.dumps(body, indent=2, sort_keys=True).encode() + b"\n"
        self._send(code, payload, "application/json")

    def _send(self, code: HTTPStatus, payload: bytes, ctype: str, allow: bool = False) -> None:
        # The reads left the socket with what remained of the deadline; a client that
        # does not read its answer gets as long again, then is dropped.
        self.connection.settimeout(self.server.request_timeout_s)
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-store")
        if code == HTTPStatus.METHOD_NOT_ALLOWED or allow:
            self.send_header("Allow", "GET")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("health_request", line=format % args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(
        self,
        address: tuple[str, int],
        endpoints: Endpoints,
        family: int,
        *,
        request_timeout_s: float,
        max_connections: int,
    ) -> None:
        self.address_family = family
        self.endpoints = endpoints
        self.request_timeout_s = request_timeout_s
        self.max_connections = max_connections
        self._slots = threading.BoundedSemaphore(max_connections)
        # Only the serving thread refuses, so one owner for the throttle.
        self._refusals = logs.Throttle(limit=1, window_s=60.0)
        super().__init__(address, _Handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        try:
            return super().get_request()
        except OSError as exc:
            if exc.errno in _OUT_OF_RESOURCES:
                # The connection stays in the backlog, so the socket stays readable and
                # serve_forever would retry at once, spinning a core until descriptors
                # come back. socketserver drops the error itself.
                time.sleep(_ACCEPT_BACKOFF_S)
            raise

    def process_request(self, request: Any, client_address: Any) -> None:
        # Runs in the serving thread, between two accepts: it must never wait.
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            left_out = self._refusals.admit("full")
            if left_out is not None:
                log.warning(
                    "health_connection_refused",
                    reason="too many connections",
                    max_connections=self.max_connections,
                    refusals_not_logged=left_out,
                )
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()  # no thread started, so none will release it
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Only I/O errors get here (do_GET logs its own): a client that resets or
        # vanishes mid-request. socketserver would print a traceback to stderr for each,
        # as many as a client cares to cause.
        log.debug("health_connection_error", exc_info=True)


class HealthServer:
    """Owns the HTTP server thread. ``start`` binds (raising on failure); ``stop`` joins.

    ``request_timeout_s`` and ``max_connections`` bound what any client can hold (see
    the module docstring); the defaults are the product's, tests pass shorter ones.
    """

    def __init__(
        self,
        host: str,
        port: int,
        endpoints: Endpoints,
        *,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self._host, self._port = host, port
        self._endpoints = endpoints
        self._request_timeout_s = request_timeout_s
        self._max_connections = max_connections
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None:
            return self._host, self._port
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        try:
            self._server = _Server(
                (self._host, self._port),
                self._endpoints,
                family,
                request_timeout_s=self._request_timeout_s,
                max_connections=self._max_connections,
            )
        except OSError as exc:
            raise HealthServerError(
                f"health server cannot listen on {self._host}:{self._port}: {exc.strerror}"
            ) from exc
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 1.0},
            name="health-server",
            daemon=True,
        )
        self._thread.start()
        log.info("health_server_listening", address=f"{self._host}:{self.address[1]}")

    def answers(self) -> bool:
        """Whether ``GET /healthz`` gets an answer (200 or 503) now. Blocks up to 5 s.

        READY=1 must mean "the health server answers", not merely "a socket is bound".
        """
        host, port = self.address
        netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            with LOOPBACK_HTTP.open(f"http://{netloc}/healthz", timeout=5) as response:
                return int(response.status) in (200, 503)
        except urllib.error.HTTPError as exc:
            return exc.code == 503
        except (TimeoutError, OSError):
            return False

    def stop(self) -> None:
        """Stop serving and release the port. Idempotent."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
