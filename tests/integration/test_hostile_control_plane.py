"""A control plane that misbehaves on purpose, on loopback: the agent stays safe and says why.

Most tests run the real agent process against a tiny ``websockets`` server that follows
a script; those about code paths a process cannot reach from outside (a failing
telemetry source, a handler's bug, the backoff clock) run :class:`Connection` in this
process against the same kind of server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import certifi
import pytest
import structlog
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from agent.config import ControlPlaneConfig, parse_config
from agent.connection import Connection, proxy_for
from agent.health.facts import ControlPlaneFacts
from agent.link import Link
from agent.protocol import MAX_INCOMING_FRAME, SUBPROTOCOL, messages
from agent.protocol.retry import Backoff
from agent.protocol.session import Stats
from tests.helpers.env import free_port, seconds, valid_config
from tests.helpers.handlers import QuietHandler
from tests.helpers.proc import AgentProcess, running_agent
from tests.integration.test_control_plane_session import (
    NODE,
    agent_config,
    control_plane,
    wait_status,
)

Script = Callable[[ServerConnection, "Hostile"], Awaitable[None]]


class Hostile:
    """A scripted control plane on 127.0.0.1, served from a thread of its own.

    ``script(ws, self)`` runs for each connection; afterwards the connection is read
    until it closes. Records request paths, every frame the agent sent, and the close
    frame the agent sent (code, reason) for each connection.
    """

    def __init__(
        self,
        script: Script,
        *,
        process_request: Callable[[ServerConnection, Request], Response | None] | None = None,
    ) -> None:
        self._script = script
        self._process_request = process_request
        self.paths: list[str] = []
        self.received: list[str | bytes] = []
        self.closes: list[tuple[int, str] | None] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.port = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/agent/v1"

    def replies(self, code: str | None = None) -> list[dict[str, Any]]:
        out = [json.loads(f) for f in list(self.received) if isinstance(f, str)]
        return [r for r in out if r["type"] == "error" and code in (None, r.get("code"))]

    def __enter__(self) -> Hostile:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            self._server.close()
            await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _start(self) -> Any:
        def process_request(ws: ServerConnection, request: Request) -> Response | None:
            self.paths.append(request.path)
            return None if self._process_request is None else self._process_request(ws, request)

        server = await serve(
            self._handle,
            "127.0.0.1",
            0,
            subprotocols=[Subprotocol(SUBPROTOCOL)],
            process_request=process_request,
            max_size=None,
            compression=None,
        )
        self.port = server.sockets[0].getsockname()[1]
        return server

    async def _handle(self, ws: ServerConnection) -> None:
        try:
            await self._script(ws, self)
            async for frame in ws:
                self.received.append(frame)
        except ConnectionClosed:
            pass
        finally:
            rcvd = ws.protocol.close_rcvd
            self.closes.append(None if rcvd is None else (rcvd.code, rcvd.reason))


async def welcome(ws: ServerConnection, hostile: Hostile | None = None, **fields: Any) -> None:
    """Read the hello and answer ``welcome`` (with ``fields`` over the defaults)."""
    await ws.recv()
    await ws.send(json.dumps({"type": "welcome", "session": "s-1", "heartbeat_s": 30, **fields}))


async def read_until(ws: ServerConnection, hostile: Hostile, done: Callable[[], bool]) -> None:
    async with asyncio.timeout(seconds(20)):
        while not done():
            hostile.received.append(await ws.recv())


def wait_until(what: Callable[[], Any], message: Callable[[], str], timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + seconds(timeout)
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(message())


def wait_error(agent: AgentProcess, words: str, timeout: float = 15.0) -> dict[str, Any]:
    def found() -> dict[str, Any] | None:
        cp: dict[str, Any] = agent.get_json("/status")[1]["control_plane"]
        return cp if words in (cp.get("last_error") or "") else None

    def why() -> str:
        return f"last_error never said {words!r}: {agent.get_json('/status')[1]}\n{agent.log()}"

    result: dict[str, Any] = wait_until(found, why, timeout)
    return result


def hostile_agent(tmp_path: Path, url: str, *, max_s: float = 1.0) -> tuple[Path, int]:
    path, port = agent_config(tmp_path, url, max_s=max_s)
    # info, not debug: websockets' own debug lines would quote frames.
    path.write_text(path.read_text().replace("level: debug", "level: info"))
    return path, port


# -- the token and the dial ---------------------------------------------------------------


def test_a_token_the_header_cannot_carry_is_a_local_error_never_quoted(tmp_path: Path) -> None:
    halves = ("firsthalfsecret-0123", "secondhalfsecret-4567")
    with control_plane(heartbeat_s=1) as cp:
        path, port = agent_config(tmp_path, cp.url, max_s=1.0)
        token_file = tmp_path / "a" / "token"
        good = token_file.read_text()
        with running_agent(path, port, tmp_path) as agent:
            wait_status(agent, "connected")
            token_file.write_text("\n".join(halves) + "\n")
            cp.close_node(NODE, 1000, "bye")
            status = wait_error(agent, "whitespace, control or non-ASCII")
            assert status["last_error"].startswith("agent-side error: ")
            assert str(token_file) in status["last_error"]

            # The mode is checked at every read too, not only at startup.
            token_file.write_text(good)
            token_file.chmod(0o640)
            status = wait_error(agent, "mode 0640")
            assert status["state"] in ("disconnected", "connecting")
            token_file.chmod(0o600)
            wait_status(agent, "connected")
            assert agent.stop()[0] == 0
            text = agent.log()
    for secret in halves:
        assert secret not in text
        assert secret not in json.dumps(status)


def test_proxy_settings_are_not_used_for_a_loopback_control_plane(tmp_path: Path) -> None:
    seen: list[bytes] = []
    with socket.create_server(("127.0.0.1", 0)) as proxy:
        proxy.settimeout(0.2)
        stop = threading.Event()

        def accept() -> None:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    conn, _ = proxy.accept()
                    with conn:
                        conn.settimeout(1)
                        with contextlib.suppress(OSError):
                            seen.append(conn.recv(4096))

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        address = f"http://127.0.0.1:{proxy.getsockname()[1]}"
        # Not http_proxy: the daemon's own probe of its health server would take it.
        env = {
            name: address
            for base in ("https_proxy", "wss_proxy", "ws_proxy")
            for name in (base, base.upper())
        }
        env |= {"no_proxy": "", "NO_PROXY": ""}
        try:
            with control_plane(heartbeat_s=1) as cp:
                path, port = agent_config(tmp_path, cp.url)
                with running_agent(path, port, tmp_path, env=env) as agent:
                    wait_status(agent, "connected")
                    assert agent.stop()[0] == 0
        finally:
            stop.set()
            thread.join(5)
    assert seen == [], "the agent went through the proxy, token and all"


def test_the_proxy_choice() -> None:
    assert proxy_for("wss://cp.example.com/agent/v1") is True
    assert proxy_for("WSS://cp.example.com/agent/v1") is True
    assert proxy_for("ws://cp.internal/agent/v1") is None  # cleartext: no proxy may see it
    assert proxy_for("wss://127.0.0.1:9000/agent/v1") is None
    assert proxy_for("wss://[::1]:9000/agent/v1") is None
    assert proxy_for("wss://localhost/agent/v1") is None


def test_a_redirect_is_not_followed(tmp_path: Path) -> None:
    def redirect(ws: ServerConnection, request: Request) -> Response | None:
        if request.path != "/agent/v1":
            return None
        return Response(302, "Found", Headers({"Location": "/elsewhere", "Content-Length": "0"}))

    with Hostile(welcome, process_request=redirect) as cp:
        path, port = hostile_agent(tmp_path, cp.url)
        with running_agent(path, port, tmp_path) as agent:
            status = wait_error(agent, "control plane answered HTTP 302")
            assert status["state"] in ("disconnected", "connecting")
            wait_until(lambda: len(cp.paths) >= 3, lambda: f"too few dials: {cp.paths}")
            assert agent.stop()[0] == 0
    assert set(cp.paths) == {"/agent/v1"}, cp.paths


# -- what the control plane sends -------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"heartbeat_s": "15"}, "heartbeat_s"),
        ({"heartbeat_s": 0}, "heartbeat_s"),
        ({"heartbeat_s": True}, "heartbeat_s"),
        ({"session": 5}, "session"),
        ({"session": "s" * (4 * 1024 * 1024)}, "session"),
    ],
)
def test_an_invalid_welcome_ends_the_session_at_once(
    tmp_path: Path, fields: dict[str, Any], field: str
) -> None:
    async def script(ws: ServerConnection, hostile: Hostile) -> None:
        await welcome(ws, **fields)

    with Hostile(script) as cp:
        path, port = hostile_agent(tmp_path, cp.url)
        with running_agent(path, port, tmp_path) as agent:
            started = time.monotonic()
            status = wait_error(agent, f"control plane sent an invalid welcome: {field}")
            assert time.monotonic() - started < seconds(10)  # not the 30 s of "no welcome"
            assert status["state"] in ("disconnected", "connecting")
            assert status["backoff_s"] < 1.0  # normal backoff, not the maximum (max_s 1)
            assert status["session_id"] is None
            wait_until(lambda: len(cp.closes) >= 2, lambda: f"no retry: {cp.closes}")
            assert agent.stop()[0] == 0
            assert len(agent.log()) < 100_000
    assert cp.closes[0] == (1002, f"invalid welcome: {field}")


def test_peer_strings_are_clipped_and_per_frame_lines_throttled(tmp_path: Path) -> None:
    huge = "E" * (1024 * 1024)
    count = 30

    async def script(ws: ServerConnection, hostile: Hostile) -> None:
        await welcome(ws)
        for _ in range(count):
            await ws.send(json.dumps({"type": "error", "code": huge, "detail": huge, "ref": huge}))
            await ws.send('{"type": "error", "code": 5}')  # invalid: never answered
            await ws.send("garbage")  # answered bad_message
        await read_until(ws, hostile, lambda: len(hostile.replies()) >= count)
        # One more frame the agent answers: it handles frames in order, so once this
        # answer is here, any (wrong) answer to an invalid error would be here too.
        await ws.send("garbage")
        await read_until(ws, hostile, lambda: len(hostile.replies()) >= count + 1)
        await ws.close(1000, "done")

    with Hostile(script) as cp:
        path, port = hostile_agent(tmp_path, cp.url, max_s=30.0)
        with running_agent(path, port, tmp_path) as agent:
            wait_until(
                lambda: "control_plane_log_suppressed" in agent.log(),
                lambda: f"no summary of the dropped lines:\n{agent.log()[-5000:]}",
            )
            assert agent.stop()[0] == 0
            lines = agent.log().splitlines()
            events = agent.log_events()
    assert max(len(line) for line in lines) < 4096
    kinds = [e["event"] for e in events]
    assert kinds.count("control_plane_error") == 10
    assert kinds.count("control_plane_bad_frame") == 10
    assert kinds.count("control_plane_frame_ignored") == 10
    suppressed = {
        e["kind"]: e["count"] for e in events if e["event"] == "control_plane_log_suppressed"
    }
    assert suppressed == {
        "control_plane_error": count - 10,
        "control_plane_bad_frame": count + 1 - 10,  # the last garbage frame too
        "control_plane_frame_ignored": count - 10,
    }
    first = next(e for e in events if e["event"] == "control_plane_error")
    assert len(first["detail"]) == len(first["code"]) == messages.MAX_DETAIL
    replies = cp.replies()
    assert len(replies) == count + 1  # every garbage frame, no invalid error
    assert all(r["code"] == "bad_message" and "ref" not in r for r in replies)


@pytest.mark.parametrize("case", ["too_big", "invalid_utf8"])
def test_a_frame_the_agent_refuses_is_reported_as_its_own_close(tmp_path: Path, case: str) -> None:
    async def script(ws: ServerConnection, hostile: Hostile) -> None:
        await welcome(ws)
        if case == "too_big":
            await ws.send("x" * MAX_INCOMING_FRAME)  # exactly 16 MiB: accepted, answered
            await read_until(ws, hostile, lambda: bool(hostile.replies("bad_message")))
            await ws.send("x" * (MAX_INCOMING_FRAME + 1))
        else:
            await ws.send(b"\xff\xfe", text=True)

    expected = {
        "too_big": (1009, "agent closed the connection: 1009 message too big"),
        "invalid_utf8": (1007, "agent closed the connection: 1007 invalid frame payload data"),
    }[case]
    with Hostile(script) as cp:
        path, port = hostile_agent(tmp_path, cp.url, max_s=30.0)
        with running_agent(path, port, tmp_path) as agent:
            wait_error(agent, expected[1])
            assert agent.stop()[0] == 0
    assert cp.closes[0] is not None and cp.closes[0][0] == expected[0]


# -- in this process: what a process cannot be made to do from outside ------------------


def _config(tmp_path: Path, url: str, **extra: Any) -> ControlPlaneConfig:
    raw = valid_config(tmp_path)
    raw["control_plane"] |= {"url": url, "reconnect": {"initial_s": 0.05, "max_s": 0.5}, **extra}
    config = parse_config(raw).control_plane
    assert config is not None
    return config


def run_connection(
    config: ControlPlaneConfig,
    until: Callable[[list[ControlPlaneFacts]], bool],
    *,
    handler: Any = None,
    telemetry: Callable[[list[dict[str, str]]], dict[str, Any]] = lambda jobs: {},
    backoff: Backoff | None = None,
    timeout: float = 15.0,
) -> list[ControlPlaneFacts]:
    """Run a :class:`Connection` until ``until(every facts published)``; then cancel it."""
    published: list[ControlPlaneFacts] = []

    async def main() -> None:
        connection = Connection(
            config,
            hello=lambda jobs: {"type": "hello", "protocol": 1, "node_id": NODE},
            telemetry=telemetry,
            handler=handler or QuietHandler(),
            publish=published.append,
            stats=Stats(),
            user_agent="test",
            backoff=backoff,
        )
        task = asyncio.create_task(connection.run())
        deadline = time.monotonic() + seconds(timeout)
        while not until(published) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())
    assert until(published), [f.last_error for f in published if f.last_error]
    return published


def errors(published: list[ControlPlaneFacts]) -> list[str]:
    return [f.last_error for f in published if f.state != "connecting" and f.last_error]


def test_a_failing_heartbeat_ends_the_session_loudly(tmp_path: Path) -> None:
    calls = [0]

    def telemetry(jobs: list[dict[str, str]]) -> dict[str, Any]:
        calls[0] += 1
        return {"cpu_pct": float("nan") if calls[0] % 2 == 0 else 1.0}  # NaN is not JSON

    async def script(ws: ServerConnection, hostile: Hostile) -> None:
        await welcome(ws, heartbeat_s=1)

    with Hostile(script) as cp, structlog.testing.capture_logs() as logged:
        published = run_connection(
            _config(tmp_path, cp.url), lambda p: len(errors(p)) >= 2, telemetry=telemetry
        )
    assert errors(published)[:2] == ["agent-side error: heartbeat failed (ValueError)"] * 2
    assert any(f.state == "connected" for f in published)
    assert cp.closes[0] == (1011, "heartbeat failed")
    failed = [e for e in logged if e["event"] == "control_plane_heartbeat_failed"]
    assert failed and failed[0]["log_level"] == "error" and failed[0].get("exc_info")


def test_a_handler_error_is_the_agents_not_a_token_or_welcome_problem(tmp_path: Path) -> None:
    class Failing(QuietHandler):
        sessions = 0

        async def on_established(self, link: Link) -> None:
            self.sessions += 1
            raise ValueError("x") if self.sessions == 1 else TimeoutError()

    with Hostile(welcome) as cp, structlog.testing.capture_logs() as logged:
        published = run_connection(
            _config(tmp_path, cp.url), lambda p: len(errors(p)) >= 2, handler=Failing()
        )
    assert errors(published)[:2] == [
        "agent-side error: ValueError in the session",
        "agent-side error: TimeoutError in the session",
    ]
    assert cp.closes[:2] == [(1011, "agent error")] * 2
    assert [e["event"] for e in logged].count("control_plane_session_failed") >= 2


def test_the_backoff_resets_only_after_a_long_session_counted_from_welcome(
    tmp_path: Path,
) -> None:
    async def slow_welcome_then_close(ws: ServerConnection, hostile: Hostile) -> None:
        await asyncio.sleep(0.7)  # longer than max_s, but before the welcome
        await welcome(ws)
        await ws.close(1000)

    backoff = Backoff(0.05, 0.5, rand=lambda: 0.999)
    with Hostile(slow_welcome_then_close) as cp:
        published = run_connection(
            _config(tmp_path, cp.url),
            lambda p: len(errors(p)) >= 4,
            backoff=backoff,
            timeout=20,
        )
    delays = [f.backoff_s for f in published if f.state == "disconnected"][:4]
    assert delays == pytest.approx([0.05, 0.1, 0.2, 0.4], rel=0.01)


def test_an_upper_case_wss_url_dials_tls(tmp_path: Path) -> None:
    first_bytes: list[bytes] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:

        def accept() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(5)
                first_bytes.append(conn.recv(1))

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        port = listener.getsockname()[1]
        config = _config(tmp_path, f"WSS://127.0.0.1:{port}/agent/v1")
        published = run_connection(config, lambda p: bool(errors(p)))
        thread.join(5)
    assert first_bytes == [b"\x16"]  # a TLS handshake record
    assert errors(published)[0].startswith("control plane unreachable")


def _openssl_key_pair(directory: Path) -> tuple[Path, Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    cert, key, encrypted = directory / "c.crt", directory / "c.key", directory / "e.key"
    for args in (
        [
            *("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
            *("-nodes", "-days", "2", "-subj", "/CN=c", "-keyout", str(key), "-out", str(cert)),
        ],
        ["pkey", "-in", str(key), "-aes256", "-passout", "pass:pw", "-out", str(encrypted)],
    ):
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)
    key.chmod(0o600)
    return cert, key, encrypted


@pytest.mark.parametrize("case", ["ca_file", "client_key"])
def test_tls_files_spoiled_after_startup_are_a_local_error(tmp_path: Path, case: str) -> None:
    url = f"wss://127.0.0.1:{free_port()}/agent/v1"
    if case == "ca_file":
        ca = tmp_path / "ca.pem"
        shutil.copy(certifi.where(), ca)
        config = _config(tmp_path, url, ca_file=str(ca))
        ca.write_text("not a certificate\n")
        words = f"agent-side error: control_plane.ca_file: {ca} holds no PEM certificate"
    else:
        cert, key, encrypted = _openssl_key_pair(tmp_path)
        config = _config(tmp_path, url, client_cert=str(cert), client_key=str(key))
        key.write_bytes(encrypted.read_bytes())  # would prompt for a passphrase on a TTY
        words = f"agent-side error: control_plane.client_key: the private key in {key} is encrypted"
    published = run_connection(config, lambda p: bool(errors(p)))
    assert errors(published)[0].startswith(words), errors(published)


# -- PROTOCOL.md 1.1's caps on job.assign ------------------------------------------------


def test_huge_assignments_are_refused_bad_spec_and_never_stored(tmp_path: Path) -> None:
    """Review item 6: twelve ~1 MiB assignments, never acknowledged, took the agent from
    53 to 1,428 MiB and the job store to 209 MiB. Each must now be refused ``bad_spec``
    (a frame over 256 KiB, or a field over its cap), and the store must stay small."""
    mib = 1024 * 1024
    base = {"type": "job.assign", "image": {"ref": "cloudbender-test/busybox:latest"}}
    base |= {"datastore": "vitals"}
    huge = [base | {"job_id": f"j-{i}", "command": ["sh", "-c", "x" * mib]} for i in range(12)]
    within_frame = [
        base | {"job_id": "j-items", "command": ["true"] * 257},
        base | {"job_id": "j-bytes", "command": ["x" * (64 * 1024 + 1)]},
        base | {"job_id": "j-env", "env": {"V": "x" * (64 * 1024)}},
        base | {"job_id": "j-types", "gpus": {"count": 0, "types": ["T"] * 17}},
    ]
    with control_plane(heartbeat_s=1) as cp:
        path, port = agent_config(tmp_path, cp.url)
        config = path.read_text() + (
            "runtime: {allowed_images: ['cloudbender-test/*'], pull: false}\n"
            "limits: {max_concurrent_jobs: 16}\n"
        )
        path.write_text(config)
        with running_agent(path, port, tmp_path) as agent:
            cp.wait_for_node(NODE, timeout=seconds(20))
            for message in huge + within_frame:
                cp.send(NODE, message)
            for message in huge + within_frame:
                reply = cp.wait_for_message(
                    NODE, "job.rejected", lambda r, i=message["job_id"]: r["job_id"] == i
                )
                assert reply["code"] == "bad_spec", reply
                assert "xxxxxxxx" not in reply["detail"]
            node = cp.node(NODE)
            assert node is not None and node.of_type("job.accepted") == []
            assert agent.get_json("/status")[1]["jobs"] == []
            assert agent.stop()[0] == 0
    store = sum(f.stat().st_size for f in (tmp_path / "a" / "state").glob("jobs.db*"))
    assert store < 256 * 1024, f"job store {store} bytes"
