"""The operator's controls end to end: a real daemon, the reference control plane, real
containers, and the CLI as root and as other users (issue 12, done means 3)."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
import yaml

from tests.helpers.env import seconds
from tests.helpers.jobnode import JobNode, job_node
from tests.helpers.operator import NOBODY, cli_as, operator_config, runtime_dir

pytestmark = pytest.mark.docker

GROUP, USERS_GID = "users", 100  # an existing group stands in for cloudbender-admin


@pytest.fixture
def ops(tmp_path: Path, docker_client: docker.DockerClient) -> Iterator[JobNode]:
    with runtime_dir() as run_dir:
        control = {"socket": str(run_dir / "control.sock"), "group": GROUP}
        with job_node(tmp_path, docker_client, control=control) as node:
            yield node


def _cli(node: JobNode, *args: str) -> subprocess.CompletedProcess[str]:
    return node.cli(*args)


def _draining(node: JobNode) -> tuple[bool, bool, str]:
    """What `status --json`, /status and /metrics say about draining."""
    shown = json.loads(_cli(node, "status", "--json").stdout)
    _, page = node.agent.get_json("/status")
    _, metrics = node.agent.get("/metrics")
    line = next(x for x in metrics.decode().splitlines() if x.startswith("cloudbender_draining"))
    return shown["draining"], page["draining"], line.split()[-1]


def _socket(node: JobNode) -> Path:
    return Path(yaml.safe_load(node.config_path.read_text())["control"]["socket"])


def _sessions(node: JobNode) -> list[str]:
    state = node.cp.node(node.node_id)
    assert state is not None
    return list(state.sessions) if state.connected else []


def _wait_new_session(node: JobNode, before: list[str], within_s: float) -> None:
    deadline = time.monotonic() + seconds(within_s)
    while not [s for s in _sessions(node) if s not in before]:
        assert time.monotonic() < deadline, f"no new session within {within_s} s"
        time.sleep(0.05)


def _operator_actions(node: JobNode) -> list[dict[str, Any]]:
    shown = _cli(node, "audit", "--json")
    entries = [json.loads(line) for line in shown.stdout.splitlines()]
    return [e for e in entries if e["kind"] == "operator_action"]


def test_drain_rejects_new_jobs_lets_running_ones_finish_and_survives_a_restart(
    ops: JobNode,
) -> None:
    """Attack (operational): the administrator drains the node before maintenance, but
    the control plane keeps placing jobs on it, or the drain kills the running job, or
    a restart during the maintenance silently undoes it. New jobs must be rejected
    `draining`, the running one finish, the node stay drained across a restart, and
    `undrain` take jobs again; status, /status and metrics say so."""
    ops.assign("j-run", "sleep 4; echo done > /opt/output/done.txt")
    ops.wait_state("j-run", "running")
    drained = _cli(ops, "drain")
    assert drained.returncode == 0, drained.stderr
    assert "draining" in drained.stdout
    ops.assign("j-new", "echo hi")
    assert (ops.reply("j-new")["type"], ops.reply("j-new")["code"]) == ("job.rejected", "draining")
    assert _draining(ops) == (True, True, "1.0")
    assert ops.wait_end("j-run")["state"] == "succeeded"

    before = _sessions(ops)
    ops.restart_agent()
    _wait_new_session(ops, before, 30)
    ops.assign("j-after-restart", "echo hi")
    assert ops.reply("j-after-restart")["code"] == "draining"

    undrained = _cli(ops, "undrain")
    assert undrained.returncode == 0, undrained.stderr
    ops.assign("j-again", "echo hi")
    assert ops.reply("j-again")["type"] == "job.accepted"
    assert ops.wait_end("j-again")["state"] == "succeeded"
    assert _draining(ops) == (False, False, "0.0")
    actions = [(e["uid"], e["command"]) for e in _operator_actions(ops)]
    assert actions == [(0, "drain"), (0, "undrain")]


def test_cancel_ends_the_job_cancelled_on_node_and_the_ledger_names_the_uid(
    ops: JobNode,
) -> None:
    """Attack (operational): a job is reading the wrong datastore and the consumer's
    administrator must stop it now, on their own node, without the provider. It must end
    `cancelled` / `cancelled_on_node` (not blamed on the control plane), its container
    gone, the control plane told, and the ledger must say who (uid 0) did it."""
    ops.assign("j-stop", "sleep 300")
    ops.wait_state("j-stop", "running")
    cancelled = _cli(ops, "cancel", "j-stop")
    assert cancelled.returncode == 0, cancelled.stderr
    end = ops.wait_end("j-stop", timeout=30)
    assert (end["state"], end["reason"]) == ("cancelled", "cancelled_on_node")
    ops.wait_gone("j-stop", timeout=30)
    (action,) = _operator_actions(ops)
    assert (action["uid"], action["command"], action["job_id"]) == (0, "cancel", "j-stop")
    assert "cancel by uid 0" in _cli(ops, "audit", "--job", "j-stop").stdout

    again = _cli(ops, "cancel", "j-stop")
    assert again.returncode == 1 and "already ended cancelled" in again.stderr
    unknown = _cli(ops, "cancel", "j-nobody-knows")
    assert unknown.returncode == 1 and "no job j-nobody-knows" in unknown.stderr
    assert len(_operator_actions(ops)) == 1  # refused commands change and record nothing


def test_a_user_outside_the_group_is_refused_and_a_member_may_drain(ops: JobNode) -> None:
    """Attack: any local user (uid 65534) drains the node or cancels the hospital's jobs
    through the control socket. Without the group the CLI must be refused with exit 77
    and words that say why and how to grant access, and nothing change; a member of the
    configured group may, and the ledger names that member's uid."""
    sock = _socket(ops)
    config = operator_config(sock.parent, sock, GROUP)
    outsider = cli_as(NOBODY, NOBODY, [], "drain", "--config", str(config))
    assert outsider.returncode == 77, outsider.stderr
    assert "permission denied" in outsider.stderr and f"usermod -aG {GROUP}" in outsider.stderr
    assert _draining(ops)[1] is False
    member = cli_as(NOBODY, NOBODY, [USERS_GID], "drain", "--config", str(config))
    assert member.returncode == 0, member.stderr
    assert _draining(ops)[1] is True
    assert [(e["uid"], e["command"]) for e in _operator_actions(ops)] == [(NOBODY, "drain")]


def test_reconnect_redials_the_control_plane_now(ops: JobNode) -> None:
    """Attack (operational): after a network change the administrator wants the link
    re-established at once rather than wait for a dead session to time out. `reconnect`
    must close the session and the control plane see a new one within seconds."""
    before = _sessions(ops)
    assert before, "connected before the test"
    done = _cli(ops, "reconnect")
    assert done.returncode == 0, done.stderr
    # Without the command, the open session would simply stay.
    _wait_new_session(ops, before, 5)
    (action,) = _operator_actions(ops)
    assert action["command"] == "reconnect"
