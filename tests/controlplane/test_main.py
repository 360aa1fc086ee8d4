"""``python -m agent.controlplane``: the standalone server for provider engineers."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from websockets.sync.client import connect

from agent.controlplane.__main__ import read_tokens
from agent.protocol import SUBPROTOCOL
from tests.controlplane.wire import TOKEN, hello
from tests.helpers.env import free_port, seconds


def test_token_file_format(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"# provider tokens\n{TOKEN} gpu-node-01\n\nother-token-0123456789  # any\n")
    assert read_tokens(path) == {TOKEN: "gpu-node-01", "other-token-0123456789": "*"}
    path.write_text(f"{TOKEN} a b\n")
    with pytest.raises(ValueError, match="TOKEN") as info:
        read_tokens(path)
    assert TOKEN not in str(info.value)


def test_standalone_server_welcomes_and_stops_on_sigterm(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN}\n")
    port = free_port()
    command = [sys.executable, "-m", "agent.controlplane", "--port", str(port)]
    command += ["--token-file", str(tokens), "--heartbeat-s", "2", "--log-format", "json"]
    command += ["--control", str(tmp_path / "cp.sock")]  # not ./, shared by concurrent runs
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url == f"ws://127.0.0.1:{port}/agent/v1"
        with connect(
            url,
            subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
            additional_headers={"Authorization": f"Bearer {TOKEN}"},
            open_timeout=seconds(5),
        ) as ws:
            ws.send(json.dumps(hello()))
            welcome = json.loads(ws.recv(seconds(5)))
            assert welcome["type"] == "welcome" and welcome["heartbeat_s"] == 2
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=seconds(10))
        assert proc.returncode == 0, err
        assert TOKEN not in err
        assert "cp.session_open" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
