"""The loopback health server: ``/healthz``, ``/status``, ``/metrics``. Read-only.

It runs the standard library's threading HTTP server in its own thread, apart from the
daemon's event loop, on purpose: when the loop hangs, ``/healthz`` still answers and
says so (the loop's heartbeat goes stale) instead of timing out with no explanation.
Handlers only read immutable snapshots, so they never block the loop.
"""

from __future__ import annotations

import json
import socket
import threading
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import structlog

from agent.errors import HealthServerError
from agent.health.facts import Problem

log = structlog.get_logger(__name__)

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Clients of the health server (the readiness self-check, the status command) ignore
# HTTP_PROXY: a proxy would reach its own loopback, not this machine's.
LOOPBACK_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class Endpoints:
    """What the server serves; each callable must be thread-safe and quick."""

    problems: Callable[[], list[Problem]]
    status: Callable[[], dict[str, Any]]
    metrics: Callable[[], bytes]


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = "cloudbender-agent"
    sys_version = ""

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
    # A slow or stuck client must not hold a thread for ever.
    timeout = 10

    def __init__(self, address: tuple[str, int], endpoints: Endpoints, family: int) -> None:
        self.address_family = family
        self.endpoints = endpoints
        super().__init__(address, _Handler)


class HealthServer:
    """Owns the HTTP server thread. ``start`` binds (raising on failure); ``stop`` joins."""

    def __init__(self, host: str, port: int, endpoints: Endpoints) -> None:
        self._host, self._port = host, port
        self._endpoints = endpoints
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
            self._server = _Server((self._host, self._port), self._endpoints, family)
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

    def stop(self) -> None:
        """Stop serving and release the port. Idempotent."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
