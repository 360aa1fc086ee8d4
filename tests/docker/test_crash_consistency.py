"""The result path survives SIGKILL at every boundary (real agent, real engine).

A chaos run once killed the agent while a job's output was being moved into the spool:
on restart the partial spool entry was deleted and the output rescanned, but the files
already moved out of it were gone, and the job ended ``succeeded`` with 2 of its 4
files. Here a crash point (agent/faults.py) kills the agent with SIGKILL exactly at each
boundary of the spool and upload steps; after a restart the control plane must accept
exactly the job's files, byte-identical, or the job must end ``failed`` with a reason:
never ``succeeded`` with fewer files.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import docker
import pytest

from agent.faults import ENV
from tests.helpers.jobnode import JobNode, job_node

pytestmark = pytest.mark.docker

# Four files, one of 4 MiB, and the job's own sha256 list of them.
SCRIPT = (
    "cd /opt/output && mkdir -p d && echo alpha > a.txt && echo beta > d/b.txt && "
    "dd if=/dev/urandom of=big.bin bs=1M count=4 2>/dev/null && "
    "dd if=/dev/urandom of=d/small.bin bs=1k count=3 2>/dev/null && "
    "sha256sum a.txt d/b.txt big.bin d/small.bin > /tmp/sums && mv /tmp/sums sums.txt"
)
FILES = {"a.txt", "d/b.txt", "big.bin", "d/small.bin", "sums.txt"}

POINTS = [
    "spool.file_copied:2",  # some files copied into the spool, not all
    "spool.files_copied",  # all copied, the manifest not yet written
    "spool.manifest_written",  # the manifest durable, the output still there
    "spool.output_removed",  # the job's end recorded, its output gone
    "upload.chunk_sent:3",  # while the results stream
]


@pytest.fixture
def docker_ok(docker_client: docker.DockerClient, test_image: str) -> docker.DockerClient:
    return docker_client


def accepted_files(node: JobNode, job_id: str) -> dict[str, bytes]:
    return {p: f.read_bytes() for p, f in node.cp.result_files(node.node_id, job_id).items()}


def check_against_own_list(files: dict[str, bytes]) -> None:
    for line in files["sums.txt"].decode().splitlines():
        digest, name = line.split()
        assert hashlib.sha256(files[name]).hexdigest() == digest, name


@pytest.mark.parametrize("point", POINTS)
def test_a_kill_at_each_boundary_never_loses_results(
    tmp_path: Path, docker_ok: docker.DockerClient, point: str
) -> None:
    """Attack (a fault, not a person): SIGKILL at ``point`` while a job's results are
    spooled or streamed; the job must not end ``succeeded`` with fewer files."""
    with job_node(tmp_path, docker_ok, agent_env={ENV: point}) as node:
        node.assign("j-crash", SCRIPT)
        code = node.respawn()
        assert code == -9, f"the crash point {point} was not reached:\n{node.agent.log()[-3000:]}"
        end = node.wait_end("j-crash", timeout=90)
        if end["state"] == "succeeded":
            files = accepted_files(node, "j-crash")
            assert set(files) == FILES, sorted(files)
            check_against_own_list(files)
            assert end.get("exit_code") == 0
        else:
            assert end["state"] == "failed" and end.get("reason"), end
        assert [e["state"] for e in node.cp.job_states(node.node_id, "j-crash")].count(
            end["state"]
        ) >= 1
        node.wait_gone("j-crash")


def test_a_restart_while_uploading_removes_the_container_when_the_job_ends(
    tmp_path: Path, docker_ok: docker.DockerClient
) -> None:
    """A job resumed after a restart in ``uploading`` once carried no container id, so
    its container was left behind when it ended; now it is removed within seconds."""
    with job_node(tmp_path, docker_ok, agent_env={ENV: "upload.chunk_sent:1"}) as node:
        node.assign("j-up", SCRIPT)
        assert node.respawn() == -9
        end = node.wait_end("j-up", timeout=90)
        assert end["state"] == "succeeded", node.agent.log()[-3000:]
        assert set(accepted_files(node, "j-up")) == FILES
        node.wait_gone("j-up", timeout=5)
