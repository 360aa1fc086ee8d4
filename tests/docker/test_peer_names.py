"""Hostile job ids against a real agent and the real engine."""

from __future__ import annotations

import json

import pytest

from tests.helpers.jobnode import IMAGE, JobNode
from tests.unit.test_peer_paths import snapshot

pytestmark = pytest.mark.docker


@pytest.mark.parametrize("job_id", ["..", ".", "../..", "/", "-rf"])
def test_a_job_id_that_is_a_path_cannot_touch_the_state_directory(
    node: JobNode, job_id: str
) -> None:
    """Attack: assigning job id ``..`` (command ``true``) emptied the state directory
    (ledger, job store, spool, models): later results went out while the ledger was an
    unlinked file, and ``audit --verify`` said "OK: 0 entries". ``.`` deleted every
    spooled result. Now such an id is refused as a message (``error``/``bad_message``),
    nothing on disk changes, and the next job is recorded in an intact ledger."""
    node.assign("j-before", "echo 1 > /opt/output/one.txt")
    assert node.wait_end("j-before")["state"] == "succeeded"
    node.wait_gone("j-before")
    before = snapshot(node.state_dir)
    cp_node = node.cp.node(node.node_id)
    assert cp_node is not None
    seen = len(cp_node.messages)
    message = {
        "type": "job.assign",
        "job_id": job_id,
        "image": {"ref": IMAGE},
        "datastore": "vitals",
        "command": ["true"],
    }
    node.cp.send_raw(node.node_id, json.dumps(message))
    error = node.cp.wait_for_message(node.node_id, "error", timeout=20, after_index=seen)
    assert error["code"] == "bad_message"
    assert node.messages("job.accepted", job_id) == []
    assert node.containers() == []
    # Nothing was created or removed; files written since are the store's and the
    # ledger's own (the heartbeat does not touch them).
    after = snapshot(node.state_dir)
    assert set(after) == set(before)

    node.assign("j-after", "echo 2 > /opt/output/two.txt")
    assert node.wait_end("j-after")["state"] == "succeeded"
    verify = node.audit_verify()
    assert verify.returncode == 0, verify.stdout + verify.stderr
    entries = [json.loads(x) for x in (node.state_dir / "audit.jsonl").read_text().splitlines()]
    assert {"j-before", "j-after"} <= {e.get("job_id") for e in entries}
