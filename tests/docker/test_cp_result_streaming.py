"""A many-file job through the real agent and the reference CP (PROTOCOL.md §5)."""

from __future__ import annotations

import pytest

from tests.helpers.jobnode import JobNode

pytestmark = pytest.mark.docker


def test_a_job_of_two_thousand_small_files_is_accepted_with_a_few_cumulative_acks(
    node: JobNode,
) -> None:
    """Attack: a CP that acks and publishes file by file turns a job of many small files
    into thousands of acks, fsyncs and renames (about 350 µs a file measured); the job
    must still end succeeded with every file, and the agent must credit the cumulative
    acks of revision 1.1 across files (else its window would fill and it would stall)."""
    n = 2_000
    script = (
        f"cd /opt/output && mkdir d && i=0; while [ $i -lt {n} ]; do "
        "echo $i > d/f$i; i=$((i+1)); done"
    )
    node.assign("j-many", script, timeout_s=300)
    end = node.wait_end("j-many", timeout=180)
    assert end["state"] == "succeeded", end
    state = node.cp.results_state(node.node_id, "j-many")
    assert len(state.files) == n
    assert all(node.result("j-many", f"d/f{i}") == f"{i}\n".encode() for i in (0, 999, n - 1))
    # About 11 KiB in all: one durable point after the last byte, maybe one at result.end.
    assert 1 <= len(state.acks) <= 2, state.acks
    assert state.acks[-1][0] == n - 1  # the last file, whole: every file before it
