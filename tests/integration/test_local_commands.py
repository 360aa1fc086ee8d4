"""Local commands (``status``, ``jobs``, ``audit``) as a person runs them on a node whose
config has a problem unrelated to them, and with their output piped into ``head``."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from agent.audit import AuditLedger, ledger_path
from tests.helpers.env import valid_config, write_config
from tests.helpers.proc import agent_command, run_cli, running_agent
from tests.unit.test_audit import one_job


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args)


def _node(tmp_path: Path) -> tuple[dict[str, Any], Path]:
    config = valid_config(tmp_path)
    Path(config["state_dir"]).mkdir(mode=0o700)
    return config, write_config(tmp_path, config)


def test_status_and_jobs_ask_the_configured_port_when_the_token_file_is_0644(
    tmp_path: Path,
) -> None:
    """Attack (on the operator, by an unrelated mistake): with the token file at mode 0644,
    `status` dropped the whole config and asked the default port 127.0.0.1:8787, reporting
    "no daemon" for an agent that was running on the configured port."""
    config, path = _node(tmp_path)
    port = int(config["health"]["listen"].rsplit(":", 1)[1])
    with running_agent(path, port, tmp_path):
        (tmp_path / "token").chmod(0o644)  # after the daemon's start, as a careless edit
        status = _cli("status", "--json", "--config", str(path))
        jobs = _cli("jobs", "--config", str(path))
    assert status.returncode in (0, 1), status.stderr  # an answer, healthy or not; 3 is none
    assert '"node_id": "test-node"' in status.stdout
    assert "control_plane.token_file" in status.stderr  # the problem is still named
    assert jobs.returncode == 0, jobs.stderr


def test_audit_reads_the_ledger_when_the_token_file_is_0644(tmp_path: Path) -> None:
    """Attack (on the auditor, by an unrelated mistake): a token file with mode 0644 made
    `audit` and `audit --verify` exit 78, so the egress ledger could not be read at all
    on exactly the node whose configuration needed looking at."""
    config, path = _node(tmp_path)
    with AuditLedger(ledger_path(Path(config["state_dir"]))) as writer:
        one_job(writer, "job-1")
    (tmp_path / "token").chmod(0o644)
    show = _cli("audit", "--config", str(path))
    assert show.returncode == 0, show.stderr
    assert len(show.stdout.splitlines()) == 7 and "job-1" in show.stdout
    assert "control_plane.token_file" in show.stderr and "check-config" in show.stderr
    verify = _cli("audit", "--verify", "--config", str(path))
    assert verify.returncode == 0, verify.stderr
    # The whole-config commands still refuse it.
    assert _cli("check-config", "--config", str(path)).returncode == 78


def test_a_problem_in_the_section_a_local_command_reads_still_exits_78(tmp_path: Path) -> None:
    """Attack (on the operator, by a typo): with `health.listen` invalid, `status` fell back
    to the default port and reported on whatever answered there, or "no daemon"."""
    config, _ = _node(tmp_path)
    config["health"]["listen"] = "8787"
    path = write_config(tmp_path, config)
    proc = _cli("status", "--config", str(path))
    assert proc.returncode == 78
    assert "health.listen" in proc.stderr


@pytest.mark.parametrize("command", [["gpus", "--json"], ["audit"]], ids=" ".join)
def test_output_piped_into_head_ends_quietly(tmp_path: Path, command: list[str]) -> None:
    """Attack (on the operator's terminal and scripts): `cloudbender-agent gpus --json |
    head -c 10` (or `audit | head -1`) printed a BrokenPipeError traceback, or Python's
    "Exception ignored ... BrokenPipeError" with exit 120, once `head` went away."""
    config, path = _node(tmp_path)
    with AuditLedger(ledger_path(Path(config["state_dir"]))) as writer:
        one_job(writer, "job-1")
    read_end, write_end = os.pipe()
    os.close(read_end)  # `head` has already had its bytes and gone: every write fails
    try:
        proc = subprocess.run(
            [*agent_command(), *command, "--config", str(path)],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
    assert proc.returncode == 0, proc.stderr
