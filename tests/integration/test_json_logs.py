"""A real ``cloudbender-agent run`` in json mode: every line it prints is one JSON object,
the lines of the libraries it uses (websockets, docker, urllib3, asyncio) included."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.env import seconds, valid_config, write_config
from tests.helpers.proc import running_agent


class _Refuse(BaseHTTPRequestHandler):
    """Answers the agent's WebSocket upgrade with 503, as a control plane being redeployed
    behind its proxy: the websockets library logs the request and the answer."""

    def do_GET(self) -> None:
        self.send_error(503)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def refusing_control_plane() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Refuse)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def test_every_line_of_a_json_mode_run_is_json(tmp_path: Path, refusing_control_plane: int) -> None:
    """Attack (on the site's log pipeline): in json mode the libraries' lines were printed
    as `DEBUG websockets.client: > GET /agent/v1 HTTP/1.1`, so a collector that parses
    each journal line as JSON dropped them or stopped on them, and the `Authorization`
    header line was one the agent's own format did not describe."""
    config: dict[str, Any] = valid_config(tmp_path)
    config["control_plane"]["url"] = f"ws://127.0.0.1:{refusing_control_plane}/agent/v1"
    config["logging"] = {"level": "debug", "format": "json"}
    path = write_config(tmp_path, config)
    port = int(config["health"]["listen"].rsplit(":", 1)[1])
    with running_agent(path, port, tmp_path) as agent:
        deadline = time.monotonic() + seconds(15)
        while '"logger": "websockets.client"' not in agent.log():
            assert time.monotonic() < deadline, agent.log()
            time.sleep(seconds(0.05))
        assert agent.get("/healthz")[0] in (200, 503)
        assert agent.stop(signal.SIGTERM)[0] == 0, agent.log()
    text = agent.log()
    events = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            events.append(json.loads(line))
        except ValueError:
            pytest.fail(f"line {number} is not JSON: {line!r}")
    loggers = {e.get("logger") for e in events}
    assert {"websockets.client", "urllib3.connectionpool"} <= loggers, loggers  # docker calls
    assert all(isinstance(e.get("event"), str) and e.get("level") for e in events)
    assert "agent_stopped" in {e["event"] for e in events}
    assert (tmp_path / "token").read_text().strip() not in text  # scrubbed, as before
