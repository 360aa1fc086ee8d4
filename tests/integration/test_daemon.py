"""The real daemon process: health endpoints, metrics, signals, reload, status command."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.env import free_port, seconds, valid_config, write_config
from tests.helpers.proc import agent_command, run_cli, running_agent


def _metrics(text: str) -> dict[str, list[Any]]:
    families: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(text):
        families.setdefault(family.name, []).extend(family.samples)
    return families


def _setup(tmp_path: Path, *, control_plane: bool = False) -> tuple[dict[str, Any], Path, int]:
    config = valid_config(tmp_path, control_plane=control_plane)
    port = int(config["health"]["listen"].rsplit(":", 1)[1])
    return config, write_config(tmp_path, config), port


def test_health_status_metrics_and_clean_sigterm(tmp_path: Path) -> None:
    config, path, port = _setup(tmp_path)
    launched = time.monotonic()
    with running_agent(path, port, tmp_path) as agent:
        code, health = agent.get_json("/healthz")
        assert code == 200, health
        assert health == {"healthy": True, "problems": []}

        code, status = agent.get_json("/status")
        assert code == 200
        assert status["node_id"] == "test-node"
        assert status["control_plane"]["state"] == "not configured"
        assert status["jobs"] == []
        assert status["datastores"] == [{"name": "vitals", "description": "ICU vitals"}]
        assert config["datastores"][0]["path"] not in json.dumps(status)
        assert status["gpus"]["gpus"] == []
        assert status["gpus"]["available"] is False
        assert status["gpus"]["reason"]
        assert status["host"]["cpu"]["logical"] >= 1
        assert status["host"]["memory_total_mib"] > 0
        # Counted from this process's start: never more than since it was launched
        # (0.1 s for the rounding), never a time since boot or the epoch.
        assert 0 <= status["uptime_s"] <= time.monotonic() - launched + 0.1

        code, body = agent.get("/metrics")
        assert code == 200
        metrics = _metrics(body.decode())
        assert metrics["cloudbender_agent_up"][0].value == 1
        info = metrics["cloudbender_agent_info"][0]
        assert info.labels["node_id"] == "test-node"
        assert info.labels["version"] == status["agent_version"]
        assert metrics["cloudbender_agent_healthy"][0].value == 1
        assert metrics["cloudbender_gpus"][0].value == 0
        assert metrics["cloudbender_host_memory_total_bytes"][0].value > 0
        assert metrics["cloudbender_state_dir_free_bytes"][0].value > 0

        assert agent.get("/nope")[0] == 404
        exit_code, took = agent.stop(signal.SIGTERM)
        assert exit_code == 0, agent.log()
        assert took < 5
        assert "agent_stopped" in agent.log()
    assert (tmp_path / "state").is_dir()
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700


def test_sigint_also_exits_cleanly(tmp_path: Path) -> None:
    _, path, port = _setup(tmp_path)
    with running_agent(path, port, tmp_path) as agent:
        assert agent.stop(signal.SIGINT)[0] == 0


def test_fake_gpus_are_reported_and_a_lost_one_makes_the_node_unhealthy(tmp_path: Path) -> None:
    _, path, port = _setup(tmp_path)
    with running_agent(path, port, tmp_path, fake_gpus="one_lost") as agent:
        code, health = agent.get_json("/healthz")
        assert code == 503
        assert [p["code"] for p in health["problems"]] == ["gpu_lost"]
        assert "GPU 1" in health["problems"][0]["detail"]

        status = agent.get_json("/status")[1]
        gpus = {g["index"]: g for g in status["gpus"]["gpus"]}
        assert gpus[0]["health"] == "ok" and gpus[0]["allocatable"] is True
        assert gpus[1]["health"] == "lost" and gpus[1]["allocatable"] is False

        metrics = _metrics(agent.get("/metrics")[1].decode())
        assert metrics["cloudbender_gpus"][0].value == 2
        assert metrics["cloudbender_agent_healthy"][0].value == 0
        by_index = {
            s.labels["index"]: s.value for s in metrics["cloudbender_gpu_memory_total_bytes"]
        }
        assert by_index == {"0": 81559 * 1024 * 1024}  # the lost GPU's is unknown, not invented
        health_samples = {
            (s.labels["index"], s.labels["state"]): s.value
            for s in metrics["cloudbender_gpu_health"]
        }
        assert health_samples[("1", "lost")] == 1
        assert health_samples[("0", "ok")] == 1
        assert {s.labels["index"] for s in metrics["cloudbender_gpu_utilization_percent"]} == {"0"}
        assert agent.stop()[0] == 0


def test_disconnected_control_plane_turns_healthz_503_after_the_limit(tmp_path: Path) -> None:
    config = valid_config(tmp_path, control_plane=True)
    # Nothing listens there: every dial is refused at once, and nothing leaves the machine.
    config["control_plane"]["url"] = f"ws://127.0.0.1:{free_port()}/agent/v1"
    config["health"]["max_disconnected_s"] = 1
    port = int(config["health"]["listen"].rsplit(":", 1)[1])
    path = write_config(tmp_path, config)
    with running_agent(path, port, tmp_path) as agent:
        status = agent.get_json("/status")[1]
        assert status["control_plane"]["state"] in ("connecting", "disconnected")
        assert status["control_plane"]["url"].startswith("ws://127.0.0.1:")
        time.sleep(seconds(1.5))
        code, health = agent.get_json("/healthz")
        assert code == 503
        assert health["problems"][0]["code"] == "control_plane_unreachable"
        assert "connection refused" in health["problems"][0]["detail"]
        assert agent.stop()[0] == 0


def test_sighup_applies_datastores_and_reports_what_needs_a_restart(tmp_path: Path) -> None:
    config, path, port = _setup(tmp_path)
    with running_agent(path, port, tmp_path) as agent:
        extra = tmp_path / "data" / "labs"
        extra.mkdir()
        config["datastores"].append({"name": "labs", "path": str(extra), "description": "Labs"})
        config["node"]["id"] = "renamed-node"
        write_config(tmp_path, config)
        agent.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + seconds(10)
        names: list[str] = []
        while time.monotonic() < deadline:
            names = [d["name"] for d in agent.get_json("/status")[1]["datastores"]]
            if "labs" in names:
                break
            time.sleep(0.05)
        assert names == ["vitals", "labs"]
        status = agent.get_json("/status")[1]
        assert status["node_id"] == "test-node"  # identity needs a restart
        reloads = [e for e in agent.log_events() if e.get("event") == "config_reloaded"]
        assert reloads and "node.id" in reloads[0]["needs_restart"]

        path.write_text("limits: {pids: 0}\n")  # a broken config is refused, the agent stays up
        agent.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + seconds(10)
        while time.monotonic() < deadline and "config_reload_failed" not in agent.log():
            time.sleep(0.05)
        assert "limits.pids" in agent.log()
        assert agent.get("/healthz")[0] == 200
        assert agent.stop()[0] == 0


def test_port_in_use_exits_nonzero_naming_the_address(tmp_path: Path) -> None:
    _, path, port = _setup(tmp_path)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        with running_agent(path, port, tmp_path, wait=False) as agent:
            assert agent.proc.wait(timeout=seconds(20)) == 1
            assert f"127.0.0.1:{port}" in agent.log()


def test_invalid_config_exits_78(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("limits: {pids: 0}\n")
    proc = subprocess.run(
        [*agent_command(), "run", "--config", str(path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 78
    assert "limits.pids" in proc.stderr


def test_status_command_shows_the_daemon_and_says_when_none_answers(tmp_path: Path) -> None:
    _, path, port = _setup(tmp_path)
    with running_agent(path, port, tmp_path) as agent:
        human = run_cli("status", "--config", str(path))
        assert human.returncode == 0, human.stderr
        assert "test-node" in human.stdout and "healthy" in human.stdout
        assert "vitals" in human.stdout
        as_json = run_cli("status", "--json", "--config", str(path))
        assert json.loads(as_json.stdout)["node_id"] == "test-node"
        agent.stop()
    nobody = run_cli("status", "--address", f"127.0.0.1:{free_port()}")
    assert nobody.returncode == 3
    assert "no daemon answers" in nobody.stderr


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_log_formats(tmp_path: Path, fmt: str) -> None:
    config, _, port = _setup(tmp_path)
    config["logging"]["format"] = fmt
    path = write_config(tmp_path, config)
    with running_agent(path, port, tmp_path) as agent:
        agent.stop()
        lines = [ln for ln in agent.log().splitlines() if "agent_started" in ln]
        assert lines
        if fmt == "json":
            assert json.loads(lines[0])["node_id"] == "test-node"
        else:
            with pytest.raises(ValueError):
                json.loads(lines[0])
    assert yaml.safe_load(path.read_text())["logging"]["format"] == fmt
