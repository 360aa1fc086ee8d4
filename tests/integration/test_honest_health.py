"""Health that tells the truth (issue 12): a real agent process against the reference
control plane on loopback, a quiet link, and a control plane that goes away cleanly."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml

from agent.protocol.retry import CONNECTED_AGAIN_WITHIN_S
from tests.helpers.env import seconds
from tests.helpers.proc import AgentProcess, running_agent
from tests.integration.test_control_plane_session import (
    NODE,
    agent_config,
    control_plane,
    wait_status,
)

MAX_DISCONNECTED_S = 2.0
POLL_S = 0.05  # how often the redial test asks /status


def _configure(path: Path) -> None:
    config = yaml.safe_load(path.read_text())
    # Backoff that would keep the node dark for up to a minute (then two) after a close.
    config["control_plane"]["reconnect"] = {"initial_s": 60.0, "max_s": 600.0}
    config["health"]["max_disconnected_s"] = MAX_DISCONNECTED_S
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def _cp_status(agent: AgentProcess) -> dict[str, Any]:
    control_plane: dict[str, Any] = agent.get_json("/status")[1]["control_plane"]
    return control_plane


def test_an_idle_link_stays_healthy_and_a_redeploy_is_redialled_within_5_s(
    tmp_path: Path,
) -> None:
    """Attack: a control plane that sends nothing after its welcome (only keepalive pongs)
    was "no contact" to the agent, so /healthz turned 503 the instant a provider redeployed
    it (close 1001), and the agent then waited out its backoff (here up to 60 s, then 120 s)
    before redialling."""
    with control_plane(heartbeat_s=0.5) as cp:
        path, port = agent_config(tmp_path, cp.url)
        _configure(path)
        with running_agent(path, port, tmp_path) as agent:
            session = wait_status(agent, "connected")["session_id"]
            # Idle for longer than max_disconnected_s: the control plane says nothing.
            idle_until = time.monotonic() + seconds(MAX_DISCONNECTED_S + 1.0)
            while time.monotonic() < idle_until:
                code, body = agent.get("/healthz")
                assert code == 200, body
                time.sleep(0.1)
            for _ in range(2):  # the second close comes after a grown backoff
                cp.disconnect_all(1001, "redeploy")
                closed_at = time.monotonic()
                # The promise is 5 s; POLL_S covers one poll that ran just before the
                # session came back, and nothing more.
                deadline = closed_at + seconds(CONNECTED_AGAIN_WITHIN_S) + POLL_S
                while True:
                    status = _cp_status(agent)
                    if status["state"] == "connected" and status["session_id"] != session:
                        break
                    assert time.monotonic() < deadline, f"not redialled: {status}"
                    if time.monotonic() - closed_at < seconds(MAX_DISCONNECTED_S * 0.7):
                        # The outage just began: the idle spell before it does not count.
                        code, body = agent.get("/healthz")
                        assert code == 200, (status, body)
                    time.sleep(POLL_S)
                session = status["session_id"]
                assert cp.node(NODE) is not None
            code, body = agent.get("/healthz")
            assert code == 200, body
