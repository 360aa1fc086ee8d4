"""The control socket's server on its own: who may use it, its file, and bad input.

A real Unix socket and real callers (another uid through the real CLI); the command
handler is a recorder, so that "nothing changed" is a fact the test can read.
"""

from __future__ import annotations

import asyncio
import grp
import json
import socket
import stat
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.control import server as control_server
from agent.control.peer import Peer
from agent.control.server import ControlServer, ControlSocketError
from tests.helpers.env import seconds
from tests.helpers.operator import NOBODY, REPO, cli_as, operator_config, runtime_dir
from tests.helpers.proc import agent_command

GROUP = "users"  # exists on every Debian/Ubuntu host; the test's "cloudbender-admin"
USERS_GID = grp.getgrnam(GROUP).gr_gid


@pytest.fixture
def run_dir() -> Iterator[Path]:
    with runtime_dir() as path:
        yield path


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[Peer, dict[str, Any]]] = []

    async def __call__(self, peer: Peer, request: dict[str, Any]) -> dict[str, Any]:
        self.calls.append((peer, request))
        return {"ok": True, "message": f"did {request['command']}"}


def _serving(
    path: Path, body: Callable[[ControlServer, Recorder], Awaitable[None]], group: str = GROUP
) -> Recorder:
    recorder = Recorder()

    async def main() -> None:
        server = ControlServer(path, group, recorder)
        await server.start()
        try:
            await body(server, recorder)
        finally:
            await server.stop()

    asyncio.run(main())
    return recorder


async def _ask(path: Path, raw: bytes) -> dict[str, Any]:
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        writer.write(raw)
        await writer.drain()
        writer.write_eof()  # a client that has said all it will
        line = await asyncio.wait_for(reader.readline(), seconds(10))
        reply: dict[str, Any] = json.loads(line)
        return reply
    finally:
        writer.close()


def test_peer_check_refuses_a_caller_outside_the_group_even_on_a_loosened_socket(
    run_dir: Path,
) -> None:
    """Attack: the socket file's mode is loosened (a chmod by mistake, a copied socket
    directory) and any local user drains the node or cancels the hospital's jobs. The
    kernel's SO_PEERCRED/SO_PEERGROUPS check must still refuse uid 65534 outside the
    group, say why, and act on nothing; the same uid with the group is let in."""
    sock = run_dir / "control.sock"
    config = operator_config(run_dir, sock, GROUP)
    results: list[subprocess.CompletedProcess[str]] = []

    async def body(server: ControlServer, recorder: Recorder) -> None:
        sock.chmod(0o666)
        for groups in ([], [USERS_GID]):
            args = ("drain", "--config", str(config))
            results.append(await asyncio.to_thread(cli_as, NOBODY, NOBODY, groups, *args))

    recorder = _serving(sock, body)
    outsider, member = results
    assert outsider.returncode == 77, outsider.stderr
    assert f"uid {NOBODY} is neither root nor a member of group 'users'" in outsider.stderr
    assert member.returncode == 0, member.stderr
    assert member.stdout.strip() == "did drain"
    # Only the member's request reached the handler, with the kernel's uid.
    assert [(p.uid, r["command"]) for p, r in recorder.calls] == [(NOBODY, "drain")]


def test_socket_file_is_0660_root_group_replaces_a_stale_one_and_goes_at_stop(
    run_dir: Path,
) -> None:
    """Attack: a socket left by a crashed agent keeps the new one from starting (no
    controls after a crash), or the new socket is born world-writable for a moment or
    owned by the wrong group. The file is 0660 root:<group>, and removed at stop."""
    sock = run_dir / "control.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock))
    stale.close()  # the file stays, nobody listens: what a SIGKILL leaves
    seen: list[Any] = []

    async def body(server: ControlServer, recorder: Recorder) -> None:
        seen.append(sock.lstat())
        seen.append(await _ask(sock, b'{"command": "undrain"}\n'))

    _serving(sock, body)
    info, reply = seen
    assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o660
    assert (info.st_uid, info.st_gid) == (0, USERS_GID)
    assert reply == {"ok": True, "message": "did undrain"}
    assert not sock.exists()


def test_a_live_agents_socket_is_not_taken_over(run_dir: Path) -> None:
    """Attack: a second agent started by hand with the same config unlinks the running
    agent's socket, leaving the real daemon without controls. It must refuse instead."""
    sock = run_dir / "control.sock"
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(sock))
    live.listen(1)
    try:
        with pytest.raises(ControlSocketError, match="another process answers"):
            _serving(sock, lambda s, r: asyncio.sleep(0))
        assert sock.exists()
    finally:
        live.close()


def test_bad_requests_get_clear_errors_and_the_server_carries_on(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attack: a caller sends garbage, a 1 MiB line, half a line, or nothing at all, to
    crash the agent or hold its control socket. Each gets an error reply naming the
    problem; the next good request is still served."""
    monkeypatch.setattr(control_server, "READ_TIMEOUT_S", seconds(0.3))
    sock = run_dir / "control.sock"
    replies: list[dict[str, Any]] = []

    async def body(server: ControlServer, recorder: Recorder) -> None:
        for raw in (
            b"not json\n",
            b"[1, 2]\n",
            b'{"command": 7}\n',
            b"\xff\xfe\n",
            b'{"command": "drain"}',  # no newline, then EOF
            b'{"command": "' + b"x" * (control_server.MAX_REQUEST + 10) + b'"}\n',
        ):
            replies.append(await _ask(sock, raw))
        reader, writer = await asyncio.open_unix_connection(str(sock))  # says nothing
        replies.append(json.loads(await asyncio.wait_for(reader.readline(), seconds(10))))
        writer.close()
        replies.append(await _ask(sock, b'{"command": "drain"}\n'))

    recorder = _serving(sock, body)
    codes = [r.get("code") for r in replies]
    assert codes == [*["bad_request"] * 5, "too_large", "timeout", None]
    assert "not valid JSON" in replies[0]["error"]
    assert replies[-1] == {"ok": True, "message": "did drain"}
    assert len(recorder.calls) == 1


def test_connections_beyond_the_cap_are_told_busy(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attack: a member of the group opens connections and never writes, to use up the
    agent's descriptors. Beyond the cap each new one is answered busy at once."""
    monkeypatch.setattr(control_server, "MAX_CONNECTIONS", 1)
    sock = run_dir / "control.sock"
    replies: list[dict[str, Any]] = []

    async def body(server: ControlServer, recorder: Recorder) -> None:
        _, holder = await asyncio.open_unix_connection(str(sock))
        await asyncio.sleep(seconds(0.1))  # let the server take the first one
        replies.append(await _ask(sock, b'{"command": "drain"}\n'))
        holder.close()

    recorder = _serving(sock, body)
    assert [r.get("code") for r in replies] == ["busy"]
    assert recorder.calls == []


def test_cli_says_no_agent_listens_and_exits_69(run_dir: Path) -> None:
    """Attack (operational): `drain` with the agent stopped prints a traceback, or
    exits 0 so a script believes the node is drained. It must exit 69 and say so."""
    config = operator_config(run_dir, run_dir / "control.sock", GROUP)
    done = subprocess.run(
        [*agent_command(), "drain", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=seconds(60),
        check=False,
        cwd=REPO,
    )
    assert done.returncode == 69
    assert "no agent listens on" in done.stderr and "Traceback" not in done.stderr
