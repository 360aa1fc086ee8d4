"""Results that leave the site (PROTOCOL.md §5), end to end with real containers."""

from __future__ import annotations

import hashlib
import json

import pytest

from tests.helpers.jobnode import JobNode
from tests.helpers.waiting import holds_for, wait_until

pytestmark = pytest.mark.docker
MIB = 1024 * 1024


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def manifest(node: JobNode, job_id: str) -> dict[str, object]:
    (found,) = node.messages("result.manifest", job_id)[:1]
    return found


@pytest.mark.parametrize(
    ("script", "why"),
    [
        ("ln -s /etc/passwd /opt/output/passwd", "a symlink to a host file"),
        ("mkfifo /opt/output/pipe", "a FIFO"),
        ("mkdir /opt/output/d && ln -s /etc /opt/output/d/etc", "a symlinked subdirectory"),
        (
            "echo ok > /opt/output/fine.txt; ln -s /tmp /opt/output/escape",
            "a link out, beside a file",
        ),
    ],
)
def test_invalid_output_fails_and_sends_nothing(node: JobNode, script: str, why: str) -> None:
    node.assign("j-bad", script)
    end = node.wait_end("j-bad")
    assert (end["state"], end["reason"]) == ("failed", "result_invalid"), why
    state = node.cp.results_state(node.node_id, "j-bad")
    assert state.manifests == ()
    assert state.chunks == 0


def test_oversize_output_fails_and_sends_nothing(node: JobNode) -> None:
    node.assign(
        "j-big",
        "dd if=/dev/zero of=/opt/output/a bs=1024 count=2048",
        results={"max_bytes": 1024 * 1024},
    )
    end = node.wait_end("j-big")
    assert (end["state"], end["reason"]) == ("failed", "result_too_large")
    assert node.cp.results_state(node.node_id, "j-big").chunks == 0


def test_many_shapes_arrive_byte_identical(node: JobNode) -> None:
    script = (
        "cd /opt/output && : > empty.txt && mkdir -p a/b/c && echo deep > a/b/c/deep.txt && "
        "mkdir small && i=0; while [ $i -lt 1000 ]; do echo $i > small/$i.txt; i=$((i+1)); done; "
        "dd if=/dev/urandom of=/opt/output/big.bin bs=1M count=200 2>/dev/null && "
        "sha256sum /opt/output/big.bin > /tmp/big.sha && mv /tmp/big.sha /opt/output/big.sha"
    )
    node.assign("j-shapes", script, timeout_s=600)
    end = node.wait_end("j-shapes", timeout=180)
    assert (end["state"], end["reason"]) == ("succeeded", "completed"), node.agent.log()[-3000:]
    files = node.cp.result_files(node.node_id, "j-shapes")
    sent = manifest(node, "j-shapes")
    by_path = {f["path"]: f for f in sent["files"]}  # type: ignore[attr-defined]
    assert len(files) == 1000 + 4
    assert files["empty.txt"].read_bytes() == b""
    assert files["a/b/c/deep.txt"].read_bytes() == b"deep\n"
    for i in range(1000):
        assert files[f"small/{i}.txt"].read_bytes() == f"{i}\n".encode()
    big = files["big.bin"].read_bytes()
    assert len(big) == 200 * MIB
    in_container = files["big.sha"].read_text().split()[0]
    assert sha256(big) == in_container == by_path["big.bin"]["sha256"]
    for path, received in files.items():
        assert sha256(received.read_bytes()) == by_path[path]["sha256"], path
    assert sent["total_bytes"] == sum(f["size"] for f in sent["files"])  # type: ignore[attr-defined]


def test_resume_after_a_dropped_session(node: JobNode) -> None:
    node.cp.results_fault("j-resume", drop_after_bytes=25 * MIB)
    node.assign(
        "j-resume",
        "dd if=/dev/urandom of=/opt/output/data.bin bs=1M count=100 2>/dev/null && "
        "sha256sum /opt/output/data.bin | cut -d' ' -f1 > /tmp/s && mv /tmp/s /opt/output/data.sha",
        timeout_s=600,
    )
    end = node.wait_end("j-resume", timeout=180)
    assert end["state"] == "succeeded", node.agent.log()[-3000:]
    state = node.cp.results_state(node.node_id, "j-resume")
    assert state.drops == 1
    assert len(state.manifests) == 2
    # The second resume told the agent what the control plane already had.
    assert any(offset >= 20 * MIB for offset in state.resumes[-1])
    assert state.wire_bytes < (100 + 32) * MIB
    files = node.cp.result_files(node.node_id, "j-resume")
    assert sha256(files["data.bin"].read_bytes()) == files["data.sha"].read_text().strip()


def test_flow_control_keeps_at_most_16_mib_unacknowledged(node: JobNode) -> None:
    node.cp.results_fault("j-window", stop_acking=True)
    node.assign(
        "j-window", "dd if=/dev/zero of=/opt/output/z.bin bs=1M count=64 2>/dev/null", timeout_s=600
    )
    node.wait_state("j-window", "uploading", timeout=60)

    def received() -> int:
        return node.cp.results_state(node.node_id, "j-window").wire_bytes

    # A full window arrived and nothing was acknowledged: the agent must now stay put.
    wait_until(lambda: received() >= 15 * MIB, lambda: f"window never filled: {received()}")
    holds_for(lambda: received() <= 16 * MIB, lambda: f"sent past the window: {received()}", 2)
    state = node.cp.results_state(node.node_id, "j-window")
    assert 0 < state.max_unacked <= 16 * MIB
    assert state.wire_bytes <= 16 * MIB
    assert node.states("j-window")[-1] == "uploading"
    node.cp.cancel(node.node_id, "j-window")
    assert node.wait_end("j-window")["state"] == "cancelled"


def test_rejected_once_is_resent_then_accepted(node: JobNode) -> None:
    node.cp.results_fault("j-rej", reject_file_once=0)
    node.assign("j-rej", "echo payload > /opt/output/a.txt")
    end = node.wait_end("j-rej")
    assert end["state"] == "succeeded"
    state = node.cp.results_state(node.node_id, "j-rej")
    assert state.rejected == ((0, "checksum_mismatch"),)
    assert state.ends == 2
    assert node.result("j-rej", "a.txt") == b"payload\n"


def test_three_rejections_fail_the_job(node: JobNode) -> None:
    node.cp.results_fault("j-rej3", reject_always=0)
    node.assign("j-rej3", "echo payload > /opt/output/a.txt")
    end = node.wait_end("j-rej3")
    assert (end["state"], end["reason"]) == ("failed", "agent_error")
    assert len(node.cp.results_state(node.node_id, "j-rej3").rejected) == 3
    # Results that will never leave do not stay on the node's disk for good.
    node.wait_gone("j-rej3")
    assert not (node.state_dir / "spool" / "j-rej3").exists()


def test_audit_ledger_records_the_job_and_detects_tampering(node: JobNode) -> None:
    node.assign(
        "j-audit", "echo 1 > /opt/output/one.txt; mkdir /opt/output/d; echo 2 > /opt/output/d/two"
    )
    assert node.wait_end("j-audit")["state"] == "succeeded"
    ledger = node.state_dir / "audit.jsonl"
    entries = [json.loads(line) for line in ledger.read_text().splitlines()]
    mine = [e for e in entries if e.get("job_id") == "j-audit"]
    assert [e["kind"] for e in mine] == [
        "job_assigned",
        "container_started",
        "result_file_sent",
        "result_file_sent",
        "result_accepted",
        "job_ended",
    ]
    assert mine[0]["datastore"] == "vitals"
    assert mine[0]["image_ref"] == "cloudbender-test/busybox:latest"
    assert str(node.data_dir) not in ledger.read_text()
    sent = {e["path"]: e for e in mine if e["kind"] == "result_file_sent"}
    assert sent["one.txt"]["sha256"] == sha256(b"1\n")
    assert sent["d/two"]["size"] == 2
    assert mine[1]["isolation"]  # the settings read back from the engine
    assert mine[-1]["state"] == "succeeded"

    verify = node.audit_verify

    assert verify().returncode == 0
    node.agent.stop()  # the ledger is the daemon's; tamper with it only once it is closed
    original = ledger.read_bytes()
    middle = len(original) // 2
    flipped = bytearray(original)
    flipped[middle] ^= 0x01
    ledger.write_bytes(bytes(flipped))
    broken = verify()
    assert broken.returncode != 0
    assert "line" in broken.stderr
    lines = original.splitlines(keepends=True)
    ledger.write_bytes(b"".join(lines[:2] + lines[3:]))
    assert verify().returncode != 0
