"""Result names that would rewrite a person's terminal, end to end with a real agent."""

from __future__ import annotations

import json

import pytest

from agent.audit import ledger_path, read
from tests.helpers.jobnode import JobNode

pytestmark = pytest.mark.docker


def test_a_result_named_with_an_escape_sequence_fails_the_job_and_sends_nothing(
    node: JobNode,
) -> None:
    """Attack: the job's container writes `scores.csv ESC[1A ESC[2K forged.csv` beside a
    real result, so that `cloudbender-agent audit` would erase the line of the real
    file and show a forged one. The output gate refuses the name: the job ends
    failed/result_invalid, no manifest and no byte leave, and no raw ESC reaches the
    agent's log."""
    node.assign(
        "j-esc",
        "echo secret > /opt/output/scores.csv && "
        ": > \"/opt/output/$(printf 'scores.csv\\033[1A\\033[2Kforged.csv')\"",
    )
    end = node.wait_end("j-esc")
    assert (end["state"], end["reason"]) == ("failed", "result_invalid"), node.agent.log()[-3000:]
    assert "\x1b" not in json.dumps(end, ensure_ascii=False)
    state = node.cp.results_state(node.node_id, "j-esc")
    assert state.manifests == () and state.chunks == 0
    entries = list(read(ledger_path(node.state_dir), "j-esc"))
    assert "result_file_sent" not in [e["kind"] for e in entries]
    assert (entries[-1]["kind"], entries[-1]["reason"]) == ("job_ended", "result_invalid")
    assert "\x1b" not in node.agent.log()
