"""The daemon speaks sd_notify to a real unix datagram NOTIFY_SOCKET, as systemd would see it."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from tests.helpers.env import seconds, valid_config, write_config
from tests.helpers.notify import messages_until
from tests.helpers.proc import running_agent


def _receive_until(sock: socket.socket, wanted: str, timeout: float) -> list[str]:
    """Every message received until one contains the line ``wanted``."""
    return messages_until(sock, lambda m: wanted in m.splitlines(), timeout, wanted)


def test_ready_watchdog_stopping(tmp_path: Path, notify_socket: socket.socket) -> None:
    config = valid_config(tmp_path, control_plane=False)
    port = int(config["health"]["listen"].rsplit(":", 1)[1])
    path = write_config(tmp_path, config)
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "1000000"}
    with running_agent(path, port, tmp_path, env=env, wait=False) as agent:
        before = _receive_until(notify_socket, "READY=1", timeout=20)
        # READY=1 means the health server answers, at once.
        assert agent.get("/healthz")[0] == 200
        ready = before[-1].splitlines()
        assert any(line.startswith("STATUS=healthy") for line in ready), ready
        assert not any("WATCHDOG=1" in m for m in before)

        # WATCHDOG_USEC of 1 s: pinged every half second while healthy.
        start = time.monotonic()
        _receive_until(notify_socket, "WATCHDOG=1", timeout=3)
        _receive_until(notify_socket, "WATCHDOG=1", timeout=3)
        assert time.monotonic() - start < seconds(3)

        agent.proc.terminate()
        _receive_until(notify_socket, "STOPPING=1", timeout=5)
        assert agent.proc.wait(timeout=seconds(5)) == 0


def test_no_watchdog_while_state_dir_is_broken(
    tmp_path: Path, notify_socket: socket.socket
) -> None:
    config = valid_config(tmp_path, control_plane=False)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the state directory's parent should be")
    config["state_dir"] = str(blocker / "state")
    port = int(config["health"]["listen"].rsplit(":", 1)[1])
    path = write_config(tmp_path, config)
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "400000"}
    with running_agent(path, port, tmp_path, env=env, wait=False) as agent:
        _receive_until(notify_socket, "READY=1", timeout=20)
        code, health = agent.get_json("/healthz")
        assert code == 503
        assert health["problems"][0]["code"] == "state_dir_unwritable"
        # Several watchdog periods pass: STATUS updates arrive, WATCHDOG=1 never does.
        messages: list[str] = []
        deadline = time.monotonic() + seconds(1.5)
        while time.monotonic() < deadline:
            try:
                messages.append(notify_socket.recv(4096).decode())
            except TimeoutError:
                continue
        assert any(m.startswith("STATUS=unhealthy") for m in messages), messages
        assert not any("WATCHDOG=1" in m.splitlines() for m in messages)
        assert agent.stop()[0] == 0
