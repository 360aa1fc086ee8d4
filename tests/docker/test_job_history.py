"""`jobs --all` and `logs JOB`: a failed job stays explainable after the control plane
acknowledged it, and a job's output cannot take over the terminal that shows it."""

from __future__ import annotations

import json
import stat
import subprocess
from pathlib import Path

import pytest

from tests.helpers.env import seconds
from tests.helpers.jobnode import JobNode, job_node

pytestmark = pytest.mark.docker


def _cli(node: JobNode, *args: str) -> subprocess.CompletedProcess[str]:
    return node.cli(*args)


def test_failed_job_is_listed_and_its_stderr_shown_after_job_ack(node: JobNode) -> None:
    """Attack (operational): the control plane acks a failed job and `jobs` forgets it at
    once, and its stderr went with the container: the administrator cannot say why it
    failed. `jobs --all` and `jobs` must still list it, `logs` must show its stderr."""
    node.assign("j-boom", "echo boom >&2; exit 3")
    assert node.wait_end("j-boom")["reason"] == "exit_nonzero"
    node.wait_gone("j-boom", timeout=seconds(30))  # the log is kept before removal
    node.cp.ack(node.node_id, "j-boom")
    listed = _cli(node, "jobs", "--all", "--json")
    assert listed.returncode == 0, listed.stderr
    (row,) = [r for r in json.loads(listed.stdout) if r["job_id"] == "j-boom"]
    assert (row["state"], row["reason"], row["exit_code"]) == ("failed", "exit_nonzero", 3)
    assert row["bytes_sent"] == 0
    failed = _cli(node, "jobs", "--all", "--state", "failed", "--since", "1h")
    assert "j-boom" in failed.stdout and "exit_nonzero, exit 3" in failed.stdout
    assert "j-boom" not in _cli(node, "jobs", "--all", "--state", "succeeded").stdout
    assert "j-boom" in _cli(node, "jobs").stdout  # acknowledged within the hour
    shown = _cli(node, "logs", "j-boom")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines() == ["boom"]


def test_job_output_with_escape_sequences_is_shown_escaped(node: JobNode) -> None:
    """Attack: a job prints ESC[2J ESC[1A and a forged line to clear the administrator's
    screen and fake what they read; `logs` must show the bytes, not obey them."""
    node.assign("j-esc", r"printf 'a\033[2J\033[1Ab\rforged\n'; exit 1")
    node.wait_end("j-esc")
    node.wait_gone("j-esc", timeout=seconds(30))
    shown = _cli(node, "logs", "j-esc")
    assert shown.returncode == 0, shown.stderr
    assert "\x1b" not in shown.stdout and "\r" not in shown.stdout
    assert shown.stdout.splitlines() == [r"a\x1b[2J\x1b[1Ab\rforged"]


def test_job_log_is_root_only_and_capped(tmp_path: Path, docker_client: object) -> None:
    """Attack: a job floods its output to fill the state directory through the kept
    log, or the log (which may quote the consumer's data) is readable by other users.
    The kept file is 0600 and at most logging.job_log_tail_kib; `--tail` shows its end."""
    with job_node(tmp_path, docker_client, logging={"job_log_tail_kib": 1}) as n:  # type: ignore[arg-type]
        n.assign("j-flood", "i=0; while [ $i -lt 500 ]; do echo line-$i; i=$((i+1)); done")
        assert n.wait_end("j-flood")["state"] == "succeeded"
        n.wait_gone("j-flood", timeout=seconds(30))
        path = n.state_dir / "logs" / "j-flood.log"
        info = path.stat()
        assert stat.S_IMODE(info.st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        assert 0 < info.st_size <= 1024
        shown = _cli(n, "logs", "j-flood", "--tail", "2")
        assert shown.stdout.splitlines() == ["line-498", "line-499"]
