"""Jobs end to end on the real engine: admission, states, isolation, cancel, timeout, exits."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import docker
import pytest

from tests.docker.conftest import bridge_gateway
from tests.helpers.env import seconds
from tests.helpers.jobnode import JobNode, job_node

pytestmark = pytest.mark.docker


# -- admission: one test per rejection code, and never a container ------------------------


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"env": {"DATA_DIR": "/etc"}}, "bad_spec"),
        ({"command": []}, "bad_spec"),
        ({"image": {}}, "bad_spec"),
        ({"datastore": "payroll"}, "unknown_datastore"),
        ({"image": {"ref": "evil.example/miner:latest"}}, "image_not_allowed"),
        ({"gpus": {"count": 1}}, "gpu_type_unavailable"),
        ({"resources": {"cpus": 64}}, "limits_exceeded"),
        ({"resources": {"memory_mib": 1_000_000}}, "limits_exceeded"),
        ({"timeout_s": 10_000_000}, "limits_exceeded"),
    ],
)
def test_rejections_create_no_container(
    node: JobNode, fields: dict[str, object], code: str
) -> None:
    node.assign("j-rejected", "echo hi", **fields)
    reply = node.reply("j-rejected")
    assert reply["type"] == "job.rejected", reply
    assert reply["code"] == code
    assert str(node.data_dir) not in reply["detail"]
    assert node.states("j-rejected") == []
    assert node.containers() == []


def test_no_capacity_when_every_slot_is_held(
    tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    with job_node(tmp_path, docker_client, limits={"max_concurrent_jobs": 1}) as node:
        node.assign("j-long", "sleep 60")
        node.wait_state("j-long", "running")
        node.assign("j-more", "echo hi")
        reply = node.reply("j-more")
        assert reply["type"] == "job.rejected"
        assert reply["code"] == "no_capacity"
        assert [c.labels["cloudbender.job-id"] for c in node.containers()] == ["j-long"]
        node.cp.send(node.node_id, {"type": "job.cancel", "job_id": "j-long"})
        node.wait_end("j-long")
        node.assign("j-after", "echo hi")  # the slot is free again
        assert node.reply("j-after")["type"] == "job.accepted"
        assert node.wait_end("j-after")["state"] == "succeeded"


def test_duplicate_and_idempotent_assign(node: JobNode) -> None:
    for _ in range(3):
        node.assign("j-once", "sleep 3; echo done > /opt/output/done.txt")
    node.wait_state("j-once", "running")
    accepted = node.messages("job.accepted", "j-once")
    assert len(accepted) == 3  # every repeat answered accepted again
    assert len(node.containers("j-once")) == 1
    node.wait_end("j-once", timeout=30)
    node.assign("j-once", "echo again")
    deadline = time.monotonic() + seconds(10)
    while time.monotonic() < deadline and not node.messages("job.rejected", "j-once"):
        time.sleep(0.05)
    (rejected,) = node.messages("job.rejected", "j-once")
    assert rejected["code"] == "duplicate_job"


# -- the job's world -----------------------------------------------------------------------


def test_job_reads_data_cannot_write_it_and_writes_output(node: JobNode) -> None:
    script = (
        "cat /opt/data/vitals.csv > /opt/output/copy.csv; "
        "(echo x > /opt/data/new.txt) 2>/opt/output/write-error.txt; "
        "echo $? > /opt/output/write-status.txt; "
        'echo "$DATA_DIR|$OUTPUT_DIR|$JOB_ID|$MODEL_DIR|$GREETING" > /opt/output/env.txt; '
        "id -u > /opt/output/uid.txt"
    )
    node.assign("j-world", script, env={"GREETING": "hello"})
    end = node.wait_end("j-world")
    assert (end["state"], end["reason"], end["exit_code"]) == ("succeeded", "completed", 0)

    def out(name: str) -> str:
        return node.result("j-world", name).decode()

    assert out("copy.csv") == (node.data_dir / "vitals.csv").read_text()
    assert out("write-status.txt").strip() != "0"
    assert "Read-only file system" in out("write-error.txt")
    assert not (node.data_dir / "new.txt").exists()
    assert out("env.txt").strip() == "/opt/data|/opt/output|j-world||hello"
    assert out("uid.txt").strip() == "65534"
    assert node.states("j-world") == ["accepted", "preparing", "running", "uploading", "succeeded"]


def test_running_container_has_every_isolation_setting(node: JobNode) -> None:
    node.assign("j-iso", "sleep 30")
    node.wait_state("j-iso", "running")
    attrs = node.wait_container("j-iso").attrs
    host = attrs["HostConfig"]
    assert host["NetworkMode"] == "none"
    assert list(attrs["NetworkSettings"]["Networks"]) == ["none"]
    assert host["ReadonlyRootfs"] is True
    assert host["CapDrop"] == ["ALL"]
    assert not host["CapAdd"]
    assert "no-new-privileges:true" in host["SecurityOpt"]
    assert not any("unconfined" in opt for opt in host["SecurityOpt"])
    assert host["PidsLimit"] > 0
    assert host["Memory"] == 256 * 1024 * 1024
    assert host["MemorySwap"] == host["Memory"]
    assert host["NanoCpus"] == 1_000_000_000
    assert attrs["Config"]["User"] == "65534:65534"
    assert "/tmp" in host["Tmpfs"]
    assert "noexec" in host["Tmpfs"]["/tmp"]
    mounts = {m["Destination"]: m for m in attrs["Mounts"]}
    assert set(mounts) == {"/opt/data", "/opt/output"}
    assert mounts["/opt/data"]["RW"] is False
    assert mounts["/opt/output"]["RW"] is True
    assert all(m["Propagation"] == "rprivate" for m in mounts.values())
    assert not any("docker.sock" in m["Source"] for m in mounts.values())
    ulimits = {u["Name"]: (u["Soft"], u["Hard"]) for u in host["Ulimits"]}
    assert ulimits == {"nofile": (1024, 1024), "core": (0, 0)}
    assert host["IpcMode"] == "private"
    assert host["CgroupnsMode"] == "private"
    assert not host["PidMode"]
    assert not host["UTSMode"]
    assert not host["UsernsMode"]
    assert host["Privileged"] is False
    assert not host["Devices"]
    assert not host["DeviceRequests"]
    assert host["LogConfig"] == {"Type": "json-file", "Config": {"max-size": "1m", "max-file": "2"}}
    assert host["RestartPolicy"]["Name"] == "no"
    assert host["Init"] is True
    assert host["Runtime"] == "runc"
    assert "NVIDIA_VISIBLE_DEVICES=void" in attrs["Config"]["Env"]
    node.cp.send(node.node_id, {"type": "job.cancel", "job_id": "j-iso"})
    node.wait_end("j-iso")


def _listener(host: str) -> tuple[socket.socket, list[object]]:
    server = socket.socket()
    server.bind((host, 0))
    server.listen()
    server.settimeout(0.2)
    seen: list[object] = []

    def accept() -> None:
        while True:
            try:
                conn, peer = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            seen.append(peer)
            conn.close()

    threading.Thread(target=accept, daemon=True).start()
    return server, seen


def test_job_cannot_reach_the_host(node: JobNode) -> None:
    bridge = bridge_gateway(node.docker)
    local, local_seen = _listener("127.0.0.1")
    gateway, gateway_seen = _listener(bridge)
    try:
        lp, gp = local.getsockname()[1], gateway.getsockname()[1]
        script = (
            f"nc -w 2 127.0.0.1 {lp} </dev/null > /opt/output/local.txt 2>&1; "
            "echo local=$? >> /opt/output/ran.txt; "
            f"nc -w 2 {bridge} {gp} </dev/null > /opt/output/bridge.txt 2>&1; "
            "echo bridge=$? >> /opt/output/ran.txt"
        )
        node.assign("j-egress", script)
        assert node.wait_end("j-egress")["state"] == "succeeded"
        ran = node.result("j-egress", "ran.txt").decode().split()
        assert [r.split("=")[0] for r in ran] == ["local", "bridge"]
        assert all(r.split("=")[1] != "0" for r in ran), ran
        assert "unreachable" in node.result("j-egress", "bridge.txt").decode()
        time.sleep(seconds(0.5))
        assert local_seen == []
        assert gateway_seen == []
    finally:
        local.close()
        gateway.close()


# -- endings ------------------------------------------------------------------------------


def test_nonzero_exit(node: JobNode) -> None:
    node.assign("j-exit", "exit 3")
    end = node.wait_end("j-exit")
    assert (end["state"], end["reason"], end["exit_code"]) == ("failed", "exit_nonzero", 3)
    assert node.states("j-exit") == ["accepted", "preparing", "running", "failed"]
    node.wait_gone("j-exit")  # removed once ended


def test_oom_killed(node: JobNode) -> None:
    node.assign(
        "j-oom",
        "head -c 400m /dev/zero | tail > /dev/null",
        resources={"memory_mib": 32},
    )
    end = node.wait_end("j-oom")
    assert (end["state"], end["reason"]) == ("failed", "oom_killed")
    assert "exit_code" in end


def test_timeout(node: JobNode) -> None:
    node.assign("j-slow", "trap '' TERM; sleep 60", timeout_s=2)
    end = node.wait_end("j-slow", timeout=30)
    assert (end["state"], end["reason"]) == ("timed_out", "timeout")
    node.wait_gone("j-slow")


def test_cancel_stops_the_container_within_the_grace_period(node: JobNode) -> None:
    node.assign("j-cancel", "trap '' TERM; sleep 120")
    node.wait_state("j-cancel", "running")
    node.wait_container("j-cancel")
    asked = time.monotonic()
    node.cp.send(node.node_id, {"type": "job.cancel", "job_id": "j-cancel"})
    end = node.wait_end("j-cancel", timeout=30)
    took = time.monotonic() - asked
    assert (end["state"], end["reason"]) == ("cancelled", "cancel_requested")
    assert took < 2 + 10  # stop_grace_s is 2 in this node's config
    deadline = time.monotonic() + seconds(10)
    while node.containers("j-cancel") and time.monotonic() < deadline:
        time.sleep(0.1)
    node.wait_gone("j-cancel")
    assert node.messages("result.manifest", "j-cancel") == []
    # Cancelling again, or an unknown job, changes nothing / is answered unknown_job.
    node.cp.send(node.node_id, {"type": "job.cancel", "job_id": "j-cancel"})
    node.cp.send(node.node_id, {"type": "job.cancel", "job_id": "j-never"})
    err = node.cp.wait_for_message(
        node.node_id, "error", predicate=lambda m: m["code"] == "unknown_job", timeout=seconds(5)
    )
    assert err["detail"] == "j-never"
    assert [s for s in node.states("j-cancel") if s == "cancelled"] == ["cancelled"]


def test_ack_removes_the_job_from_hello_and_status(node: JobNode) -> None:
    node.assign("j-ack", "exit 1")
    node.wait_end("j-ack")
    jobs = node.agent.get_json("/status")[1]["jobs"]
    assert [j["job_id"] for j in jobs] == ["j-ack"]
    assert jobs[0]["state"] == "failed"
    node.cp.send(node.node_id, {"type": "job.ack", "job_id": "j-ack"})
    deadline = time.monotonic() + seconds(10)
    while time.monotonic() < deadline and node.agent.get_json("/status")[1]["jobs"]:
        time.sleep(0.05)
    assert node.agent.get_json("/status")[1]["jobs"] == []
