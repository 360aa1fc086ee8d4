"""Arbitrary frames from the control plane at a live agent over a real socket (§2)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings

from agent.controlplane import ThreadedControlPlane
from tests.helpers.env import seconds, valid_config, write_config
from tests.helpers.proc import AgentProcess, running_agent
from tests.helpers.strategies import frames

TOKEN = "s3cr3t-token-for-tests-0123456789"
NODE = "fuzzed-node"


@pytest.fixture(scope="module")
def live(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[ThreadedControlPlane, AgentProcess]]:
    tmp_path = tmp_path_factory.mktemp("fuzz")
    cp = ThreadedControlPlane(tokens={TOKEN: NODE}, heartbeat_s=1)
    cp.start()
    config = valid_config(tmp_path)
    config["node"]["id"] = NODE
    config["control_plane"]["url"] = cp.url
    config["control_plane"]["reconnect"] = {"initial_s": 0.2, "max_s": 1}
    port = int(config["health"]["listen"].rsplit(":", 1)[1])
    try:
        with running_agent(write_config(tmp_path, config), port, tmp_path) as agent:
            cp.wait_for_message(NODE, "heartbeat", timeout=seconds(20))
            yield cp, agent
    finally:
        cp.stop()


@settings(
    max_examples=2000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(frame=frames)
def test_arbitrary_frames(
    live: tuple[ThreadedControlPlane, AgentProcess], frame: str | bytes
) -> None:
    cp, agent = live
    if isinstance(frame, str) and "unsupported_protocol" in frame:
        return  # the one message that rightly ends a session (tested elsewhere)
    cp.send_raw(NODE, frame)
    assert agent.proc.poll() is None


def test_after_the_fuzz_the_agent_is_up_connected_and_beating(
    live: tuple[ThreadedControlPlane, AgentProcess],
) -> None:
    cp, agent = live
    node = cp.node(NODE)
    assert node is not None
    assert node.connected
    sessions = len(node.sessions)
    index = len(node.messages)
    beat = cp.wait_for_message(NODE, "heartbeat", after_index=index, timeout=seconds(5))
    assert beat["seq"] > 1
    assert agent.proc.poll() is None
    assert agent.get("/healthz")[0] == 200
    node = cp.node(NODE)
    assert node is not None
    assert len(node.sessions) == sessions == 1, "the fuzz must not have cost a reconnect"
    errors = [m for m in node.of_type("error") if m["code"] in ("bad_message", "unknown_type")]
    assert len(errors) > 100, "the agent answered the garbage"
    assert node.violations == [], node.violations
