"""The ledger counts result bytes once (docs/audit.md): real jobs, a control plane that
drops the session mid-upload, and an agent restarted mid-upload."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from tests.helpers.env import seconds
from tests.helpers.jobnode import JobNode
from tests.helpers.proc import run_cli

pytestmark = pytest.mark.docker
MIB = 1024 * 1024


def _entries(node: JobNode, job_id: str) -> list[dict[str, Any]]:
    lines = (node.state_dir / "audit.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e.get("job_id") == job_id]


def _audit_job(node: JobNode, job_id: str) -> list[str]:
    """``cloudbender-agent audit --job`` as a person runs it; its lines."""
    proc = run_cli("audit", "--job", job_id, "--config", str(node.config_path), timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def _totals_line(job_id: str, files: int, once: int, again: int) -> str:
    return (
        f"job {job_id}: {files} result file(s), {once} bytes sent once, {again} bytes sent "
        f"again, at most {once + again} bytes left this site"
    )


def test_a_dropped_session_shows_each_file_once_and_the_resent_range(node: JobNode) -> None:
    """Attack (accounting): the control plane dropped the session mid-upload; the agent
    sent again, from the control plane's resume offset, bytes it had already sent, and
    the ledger did not say so: an auditor could not tell how much left. One
    `result_file_sent` per file, a `result_range_resent` from the resume offset, and
    `audit --job` adds the file once and the range apart."""
    node.cp.results_fault("j-drop", drop_after_bytes=3 * MIB - 1)
    node.assign(
        "j-drop",
        "dd if=/dev/urandom of=/opt/output/data.bin bs=1M count=8 2>/dev/null && "
        "echo done > /opt/output/note.txt",
        timeout_s=300,
    )
    end = node.wait_end("j-drop", timeout=120)
    assert end["state"] == "succeeded", node.agent.log()[-3000:]
    state = node.cp.results_state(node.node_id, "j-drop")
    assert state.drops == 1
    entries = _entries(node, "j-drop")
    sent = [e for e in entries if e["kind"] == "result_file_sent"]
    assert sorted(e["path"] for e in sent) == ["data.bin", "note.txt"]
    resent = [e for e in entries if e["kind"] == "result_range_resent"]
    # data.bin for sure (its next chunk was on its way when the session dropped); the
    # next file too when the agent had got that far ahead of the control plane.
    assert "data.bin" in [e["path"] for e in resent]
    files = {f["path"]: f for f in state.manifests[-1]["files"]}
    for e in resent:  # from where the control plane said it stood, to the file's end at most
        assert e["why"] == "session_lost"
        assert e["start"] == state.resumes[-1][files[e["path"]]["index"]]
        assert e["start"] < e["end"] <= files[e["path"]]["size"]
    # Every entry came before the bytes it describes: written before result_accepted.
    kinds = [e["kind"] for e in entries]
    assert kinds.index("result_range_resent") < kinds.index("result_accepted")
    once = sum(e["size"] for e in sent)
    again = sum(e["end"] - e["start"] for e in resent)
    assert once + again >= state.wire_bytes  # the ledger never says less than arrived
    lines = _audit_job(node, "j-drop")
    assert _totals_line("j-drop", 2, once, again) in lines
    assert node.audit_verify().returncode == 0


def test_an_agent_restarted_mid_upload_records_no_file_twice(node: JobNode) -> None:
    """Attack (accounting): the agent restarted in the middle of an upload and the next
    run wrote a second `result_file_sent` for every file, so the ledger said 2x what
    left. Each file stays recorded once; what the new run sends again is a
    `result_range_resent` (`agent_restarted`, to the end of the file)."""
    node.cp.results_fault("j-restart", stop_acking=True)  # holds the upload in the window
    node.assign(
        "j-restart", "dd if=/dev/urandom of=/opt/output/big.bin bs=1M count=20", timeout_s=300
    )
    deadline = time.monotonic() + seconds(120)
    while node.cp.results_state(node.node_id, "j-restart").wire_bytes < 16 * MIB:
        assert time.monotonic() < deadline, node.agent.log()[-3000:]
        time.sleep(0.05)
    node.restart_agent(between=lambda: node.cp.results_fault("j-restart"))
    end = node.wait_end("j-restart", timeout=120)
    assert end["state"] == "succeeded", node.agent.log()[-3000:]
    state = node.cp.results_state(node.node_id, "j-restart")
    entries = _entries(node, "j-restart")
    assert [e["path"] for e in entries if e["kind"] == "result_file_sent"] == ["big.bin"]
    resent = [e for e in entries if e["kind"] == "result_range_resent"]
    assert [(e["start"], e["end"], e["why"]) for e in resent] == [
        (state.resumes[-1][0], 20 * MIB, "agent_restarted")
    ]
    again = 20 * MIB - state.resumes[-1][0]
    assert _totals_line("j-restart", 1, 20 * MIB, again) in _audit_job(node, "j-restart")
    assert node.audit_verify().returncode == 0
