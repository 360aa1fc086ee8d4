"""SIGHUP: what a reload applies, and what it reports as needing a restart."""

from __future__ import annotations

from pathlib import Path

from agent.config import parse_config
from agent.reload import plan_reload
from tests.helpers.env import valid_config


def test_reloadable_keys_apply_and_identity_waits_for_restart(tmp_path: Path) -> None:
    raw = valid_config(tmp_path)
    old = parse_config(raw)
    raw["limits"] = {"max_concurrent_jobs": 4}
    raw["runtime"] = {"allowed_images": ["reg/provider/*"], "docker_host": "tcp://127.0.0.1:2375"}
    raw["node"]["id"] = "other"
    raw["health"]["max_disconnected_s"] = 30
    new = parse_config(raw)
    plan = plan_reload(old, new)
    assert plan.config.limits.max_concurrent_jobs == 4
    assert plan.config.runtime.allowed_images == ("reg/provider/*",)
    assert plan.config.health.max_disconnected_s == 30
    assert plan.config.node.id == "test-node"
    assert plan.config.runtime.docker_host == old.runtime.docker_host
    assert plan.config.health.listen == old.health.listen
    assert set(plan.needs_restart) == {"node.id", "runtime.docker_host"}
    assert "limits.max_concurrent_jobs" in plan.applied
    assert "runtime.allowed_images" in plan.applied


def test_no_change_no_report(tmp_path: Path) -> None:
    config = parse_config(valid_config(tmp_path))
    plan = plan_reload(config, config)
    assert plan.applied == () and plan.needs_restart == ()
    assert plan.config == config
