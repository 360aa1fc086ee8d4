"""Issue 12, reload that keeps its word: real SIGHUPs to a real daemon, one key each,
and the pending-restart row of `status` for the keys a reload cannot apply."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.helpers.env import free_port, seconds, valid_config, write_config
from tests.helpers.proc import AgentProcess, run_cli, running_agent


def _until(check: Callable[[], Any], what: str, agent: AgentProcess, timeout: float = 10) -> Any:
    deadline = time.monotonic() + seconds(timeout)
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.05)
    raise AssertionError(f"{what} did not happen:\n{agent.log()[-3000:]}")


def _reload(agent: AgentProcess, tmp_path: Path, config: dict[str, Any]) -> None:
    """Write ``config`` and SIGHUP the agent; return once it logged the reload."""
    before = agent.log().count("config_reloaded")
    write_config(tmp_path, config)
    agent.proc.send_signal(signal.SIGHUP)
    _until(lambda: agent.log().count("config_reloaded") > before, "the reload", agent)


def test_sighup_applies_gpus_disk_floor_and_disconnect_limit_and_shows_pending_restart(
    tmp_path: Path,
) -> None:
    """Attack: an operator changes gpus.allow, limits.min_free_mib and
    health.max_disconnected_s, sends SIGHUP, reads "applied" in the log, and the node
    goes on with the start-up values; and a changed node.id silently waits for a
    restart nobody knows is needed."""
    config = valid_config(tmp_path)
    # Nothing listens there: the link stays down, which max_disconnected_s then judges.
    config["control_plane"]["url"] = f"ws://127.0.0.1:{free_port()}/agent/v1"
    config["control_plane"]["allow_insecure"] = True
    port = int(config["health"]["listen"].rsplit(":", 1)[1])
    path = write_config(tmp_path, config)
    with running_agent(path, port, tmp_path, fake_gpus="two_healthy") as agent:
        status = agent.get_json("/status")[1]
        assert [g["allocatable"] for g in status["gpus"]["gpus"]] == [True, True]
        assert status["pending_restart"] == []
        assert agent.get("/healthz")[0] == 200

        config["gpus"] = {"allow": [1]}
        config["limits"] = {"min_free_mib": 10**9}  # MiB: more than any disk here
        config["health"]["max_disconnected_s"] = 0.5
        config["node"]["id"] = "renamed-node"
        _reload(agent, tmp_path, config)

        status = agent.get_json("/status")[1]
        assert [g["allocatable"] for g in status["gpus"]["gpus"]] == [False, True]  # gpus
        assert status["pending_restart"] == ["node.id"]
        codes = _until(
            lambda: (
                {p["code"] for p in agent.get_json("/healthz")[1]["problems"]}
                >= {"state_dir_low_space", "control_plane_unreachable"}
                and agent.get_json("/healthz")
            ),
            "503 for the floor and the disconnect limit",
            agent,
        )
        assert codes[0] == 503
        low = next(p for p in codes[1]["problems"] if p["code"] == "state_dir_low_space")
        assert "under limits.min_free_mib 1000000000 MiB" in low["detail"]
        shown = run_cli("status", "--address", f"127.0.0.1:{port}", timeout=30)
        assert "Restart needed yes, for node.id" in shown.stdout, shown.stdout + shown.stderr

        config["node"]["id"] = "test-node"  # back as it runs: no restart needed any more
        config["logging"]["format"] = "console"
        _reload(agent, tmp_path, config)
        assert agent.get_json("/status")[1]["pending_restart"] == []
        last = [line for line in agent.log().splitlines() if "config_reloaded" in line][-1]
        assert not last.lstrip().startswith("{"), last  # logging.format: console now
        assert agent.stop()[0] == 0
