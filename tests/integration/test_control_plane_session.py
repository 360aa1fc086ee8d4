"""The real agent process against the reference control plane on loopback (PROTOCOL.md §1-3)."""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from agent.controlplane import ThreadedControlPlane
from tests.helpers.env import free_port, seconds, valid_config, write_config
from tests.helpers.proc import AgentProcess, run_cli, running_agent

TOKEN = "s3cr3t-token-for-tests-0123456789"
NODE = "test-node"


def agent_config(
    tmp_path: Path, cp_url: str, *, node_id: str = NODE, max_s: float = 1.0, name: str = "a"
) -> tuple[Path, int]:
    home = tmp_path / name
    home.mkdir(exist_ok=True)
    config = valid_config(home)
    config["node"]["id"] = node_id
    config["control_plane"]["url"] = cp_url
    config["control_plane"]["reconnect"] = {"initial_s": 0.2, "max_s": max_s}
    config["logging"]["level"] = "debug"
    port = int(config["health"]["listen"].rsplit(":", 1)[1])
    return write_config(home, config), port


@contextmanager
def control_plane(**kwargs: Any) -> Iterator[ThreadedControlPlane]:
    kwargs.setdefault("tokens", {TOKEN: "*"})
    cp = ThreadedControlPlane(**kwargs)
    cp.start()
    try:
        yield cp
    finally:
        cp.stop()


def wait_status(agent: AgentProcess, state: str, timeout: float = 15.0) -> dict[str, Any]:
    deadline = time.monotonic() + seconds(timeout)
    cp: dict[str, Any] = {}
    while time.monotonic() < deadline:
        cp = agent.get_json("/status")[1]["control_plane"]
        if cp["state"] == state:
            return cp
        time.sleep(0.05)
    raise AssertionError(f"control plane state never became {state}: {cp}\n{agent.log()}")


def test_hello_first_with_every_field_and_no_host_path(tmp_path: Path) -> None:
    with control_plane(heartbeat_s=1) as cp:
        path, port = agent_config(tmp_path, cp.url)
        with running_agent(path, port, tmp_path) as agent:
            cp.wait_for_node(NODE, timeout=seconds(20))
            node = cp.node(NODE)
            assert node is not None
            assert node.messages[0].type == "hello"
            hello = node.hello
            assert hello is not None
            assert hello["protocol"] == 1
            assert hello["node_id"] == NODE
            assert hello["labels"] == {"site": "test"}
            assert isinstance(hello["agent_version"], str) and hello["hostname"]
            inventory = hello["inventory"]
            assert inventory["gpus"] == []
            assert inventory["cpu"]["logical"] >= 1
            assert inventory["memory_total_mib"] > 0
            assert inventory["runtime"]["engine"] == "docker"
            assert set(inventory["runtime"]) == {"engine", "version", "gpu_support"}
            assert hello["datastores"] == [{"name": "vitals", "description": "ICU vitals"}]
            assert hello["capacity"] == {"max_concurrent_jobs": 2}
            assert hello["jobs"] == []
            text = json.dumps(hello)
            for secret in (str(tmp_path), TOKEN, "/var/lib", "/etc/cloudbender"):
                assert secret not in text
            assert node.violations == []

            beats = []
            deadline = time.monotonic() + seconds(10)
            while time.monotonic() < deadline and len(beats) < 3:
                beats = cp.node(NODE).of_type("heartbeat")  # type: ignore[union-attr]
                time.sleep(0.1)
            assert [b["seq"] for b in beats[:3]] == [1, 2, 3]
            assert all(isinstance(b["ts"], float) for b in beats)
            assert all(b["gpus"] == [] and b["jobs"] == [] for b in beats)
            assert beats[0]["memory_used_mib"] > 0

            status = wait_status(agent, "connected")
            assert status["session_id"] == cp.node(NODE).session  # type: ignore[union-attr]
            assert agent.stop()[0] == 0
            cp.wait_for_disconnect(NODE, timeout=seconds(5))


def test_reconnects_after_the_control_plane_restarts(tmp_path: Path) -> None:
    with control_plane(heartbeat_s=1, port=free_port()) as cp:
        path, port = agent_config(tmp_path, cp.url, max_s=1.0)
        with running_agent(path, port, tmp_path) as agent:
            cp.wait_for_node(NODE, timeout=seconds(20))
            first_session = wait_status(agent, "connected")["session_id"]
            cp.stop()
            down = wait_status(agent, "disconnected")
            assert down["last_error"]
            stopped_at = time.monotonic()
            time.sleep(seconds(1.5))  # a few failed dials against a closed port
            cp.start()
            restarted_at = time.monotonic()
            again = wait_status(agent, "connected", timeout=10)
            took = time.monotonic() - restarted_at
            # Backoff is capped at max_s (1 s), plus the dial itself.
            assert took < seconds(1.0 + 1.5), took
            assert again["session_id"] != first_session
            assert again["attempts"] >= 3
            hellos = cp.node(NODE).of_type("hello")  # type: ignore[union-attr]
            assert len(hellos) == 2
            assert time.monotonic() - stopped_at > 1.0
            assert agent.stop()[0] == 0


def test_wrong_token_is_auth_failed_and_retried_at_max_backoff_only(tmp_path: Path) -> None:
    attempts: list[float] = []
    lock = threading.Lock()

    def tokens(presented: str) -> str | None:
        with lock:
            attempts.append(time.monotonic())
        return "*" if presented == "some-other-token-entirely" else None

    with control_plane(tokens=tokens) as cp:
        path, port = agent_config(tmp_path, cp.url, max_s=1.0)
        with running_agent(path, port, tmp_path) as agent:
            status = wait_status(agent, "auth_failed")
            assert "token refused by control plane" in status["last_error"]
            time.sleep(seconds(3.5))
            status = agent.get_json("/status")[1]["control_plane"]
            assert status["state"] == "auth_failed"
            with lock:
                seen = list(attempts)
            gaps = [b - a for a, b in itertools.pairwise(seen)]
            assert len(seen) >= 3, seen
            assert min(gaps) >= 1.0 * 0.98, gaps  # never faster than max_s
            assert status["backoff_s"] >= 1.0
            shown = run_cli("status", "--config", str(path))
            assert "auth_failed" in shown.stdout
            assert "last error: token refused by control plane" in shown.stdout
            assert "next attempt in" in shown.stdout
            assert TOKEN not in shown.stdout + agent.log()
            assert agent.stop()[0] == 0


def test_second_agent_with_same_node_id_gets_4409(tmp_path: Path) -> None:
    with control_plane(heartbeat_s=1) as cp:
        path_a, port_a = agent_config(tmp_path, cp.url, max_s=30.0, name="a")
        path_b, port_b = agent_config(tmp_path, cp.url, max_s=30.0, name="b")
        with running_agent(path_a, port_a, tmp_path) as first:
            wait_status(first, "connected")
            with running_agent(path_b, port_b, tmp_path) as second:
                wait_status(second, "connected")
                replaced = wait_status(first, "replaced")
                assert "same node id" in replaced["last_error"]
                # Retried at the maximum backoff (30 s here), not at once.
                assert replaced["backoff_s"] >= 30.0
                assert second.stop()[0] == 0
            assert first.stop()[0] == 0


def test_subprotocol_not_selected_is_refused(tmp_path: Path) -> None:
    with control_plane(select_subprotocol=False) as cp:
        path, port = agent_config(tmp_path, cp.url, max_s=5.0)
        with running_agent(path, port, tmp_path) as agent:
            status = wait_status(agent, "unsupported_protocol")
            assert "cloudbender-agent.v1" in status["last_error"]
            assert cp.node(NODE) is None or cp.node(NODE).hello is None  # type: ignore[union-attr]
            assert agent.stop()[0] == 0


def test_unsupported_protocol_is_reported(tmp_path: Path) -> None:
    with control_plane(protocol_versions={2}) as cp:
        path, port = agent_config(tmp_path, cp.url, max_s=5.0)
        with running_agent(path, port, tmp_path) as agent:
            status = wait_status(agent, "unsupported_protocol")
            assert "protocol version 1" in status["last_error"]
            assert agent.stop()[0] == 0


def test_metrics_count_messages_and_reconnects(tmp_path: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    with control_plane(heartbeat_s=1) as cp:
        path, port = agent_config(tmp_path, cp.url)
        with running_agent(path, port, tmp_path) as agent:
            cp.wait_for_message(NODE, "heartbeat", timeout=seconds(10))
            cp.send_raw(NODE, "not json")
            cp.wait_for_message(
                NODE, "error", predicate=lambda m: m["code"] == "bad_message", timeout=seconds(5)
            )
            samples = {
                (s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(agent.get("/metrics")[1].decode())
                for s in family.samples
            }
            out = "cloudbender_control_plane_messages_total"
            assert samples[(out, (("direction", "out"), ("type", "hello")))] == 1
            assert samples[(out, (("direction", "out"), ("type", "heartbeat")))] >= 1
            assert samples[(out, (("direction", "out"), ("type", "error")))] == 1
            assert samples[(out, (("direction", "in"), ("type", "welcome")))] == 1
            state = "cloudbender_control_plane_state"
            assert samples[(state, (("state", "connected"),))] == 1
            assert ("cloudbender_control_plane_reconnects_total", ()) in samples
            assert agent.stop()[0] == 0


@pytest.mark.parametrize("good_first", [False, True])
def test_token_never_in_any_log_line(tmp_path: Path, good_first: bool) -> None:
    """A session with a wrong token, then one with the right one, at debug level."""
    wrong = "wrong-token-also-secret-9876543210"
    with control_plane(heartbeat_s=1) as cp:
        path, port = agent_config(tmp_path, cp.url, max_s=1.0)
        token_file = tmp_path / "a" / "token"
        token_file.write_text((TOKEN if good_first else wrong) + "\n")
        with running_agent(path, port, tmp_path) as agent:
            wait_status(agent, "connected" if good_first else "auth_failed")
            token_file.write_text((wrong if good_first else TOKEN) + "\n")
            if good_first:
                cp.close_node(NODE, 4401, "token revoked")
            wait_status(agent, "auth_failed" if good_first else "connected", timeout=20)
            assert agent.stop()[0] == 0
            log = agent.log()
    assert "control_plane_connected" in log
    assert "control_plane_disconnected" in log
    for secret in (TOKEN, wrong):
        assert secret not in log


def test_a_stopping_agent_closes_with_1001(tmp_path: Path) -> None:
    with control_plane(heartbeat_s=1) as cp:
        path, port = agent_config(tmp_path, cp.url)
        with running_agent(path, port, tmp_path) as agent:
            wait_status(agent, "connected")
            code, took = agent.stop()
            assert code == 0
            assert took < seconds(5)
            gone = cp.wait_for_disconnect(NODE, timeout=seconds(5))
    assert (gone.code, gone.reason, gone.by) == (1001, "agent stopping", "agent")
