"""``cloudbender-cp`` against a real agent on the real engine, every part a process.

The control plane runs as ``cloudbender-cp serve``; each command is another
``cloudbender-cp`` process that reaches it over its control socket, as a provider
engineer would type them in a second shell.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import docker.errors
import pytest

from tests.controlplane.cpcli import TOKEN, CpServer, running_cp
from tests.controlplane.test_cli import example_copy
from tests.helpers.env import seconds, valid_config, write_config
from tests.helpers.jobnode import list_containers, unmount_under
from tests.helpers.proc import AgentProcess, running_agent

pytestmark = pytest.mark.docker


@dataclass
class Site:
    cp: CpServer
    agent: AgentProcess
    node_id: str
    tmp_path: Path

    def wait_state(self, job_id: str, state: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + seconds(timeout)
        while time.monotonic() < deadline:
            jobs = {j["job_id"]: j for j in self.cp.json("jobs")["jobs"]}
            if jobs.get(job_id, {}).get("state") == state:
                return
            time.sleep(0.1)
        raise AssertionError(f"{job_id} never {state}: {jobs}\n{self.agent.log()[-2000:]}")


@pytest.fixture
def site(tmp_path: Path, docker_client: docker.DockerClient, test_image: str) -> Iterator[Site]:
    """``cloudbender-cp serve`` and a real agent connected to it (as tests.helpers.jobnode
    builds one: the test image allowed, never pulled, the datastore readable by nobody)."""
    node_id = f"cli-{uuid.uuid4().hex[:10]}"
    config = valid_config(tmp_path)
    data_dir = Path(config["datastores"][0]["path"])
    data_dir.chmod(0o755)
    (data_dir / "vitals.csv").write_text("patient,hr\n1,80\n2,95\n")
    (data_dir / "vitals.csv").chmod(0o644)
    Path(config["control_plane"]["token_file"]).write_text(TOKEN + "\n")
    config["node"]["id"] = node_id
    config["control_plane"]["reconnect"] = {"initial_s": 0.2, "max_s": 2}
    config["runtime"] = {"allowed_images": ["cloudbender-test/*"], "pull": False, "stop_grace_s": 2}
    config["limits"] = {"max_concurrent_jobs": 2, "max_memory_mib": 256, "max_cpus": 1}
    port = int(config["health"]["listen"].rsplit(":", 1)[1])
    try:
        with running_cp(tmp_path, args=["--node", node_id]) as cp:
            config["control_plane"]["url"] = cp.url
            with running_agent(write_config(tmp_path, config), port, tmp_path) as agent:
                deadline = time.monotonic() + seconds(20)
                while not any(n["connected"] for n in cp.json("nodes")["nodes"]):
                    assert time.monotonic() < deadline, agent.log()[-2000:]
                    time.sleep(0.1)
                yield Site(cp, agent, node_id, tmp_path)
    finally:
        for container in list_containers(docker_client, [f"cloudbender.node-id={node_id}"]):
            with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                container.remove(force=True)
        unmount_under(tmp_path)


def test_submit_watch_and_find_the_results(site: Site) -> None:
    nodes = site.cp.json("nodes")["nodes"]
    assert [(n["node_id"], n["datastores"]) for n in nodes] == [(site.node_id, ["vitals"])]

    submitted = site.cp.run("submit", str(example_copy(site.tmp_path)), "--node", site.node_id)
    assert submitted.returncode == 0, submitted.stderr
    assert "job example-hr-flags-001 sent to" in submitted.stdout
    assert submitted.stdout.rstrip().endswith("accepted")

    watched = site.cp.run("watch", "example-hr-flags-001", "--timeout", str(seconds(60)))
    assert watched.returncode == 0, watched.stdout + watched.stderr + site.agent.log()[-2000:]
    states = [line.split()[1] for line in watched.stdout.splitlines()[:-2]]
    assert states[0] == "accepted" and "running" in states and states[-1] == "succeeded"
    assert "example-hr-flags-001: succeeded (completed, exit code 0)" in watched.stdout

    results = site.cp.json("results", "example-hr-flags-001")
    [flags] = results["files"]
    stored = Path(flags["stored"])
    assert stored.read_bytes() == b"1,0\n2,1\n"  # hr over the model's threshold of 90
    assert flags["sha256"] == hashlib.sha256(stored.read_bytes()).hexdigest()
    assert flags["size"] == 8 and flags["path"] == "flags.csv"
    assert stored.parent == Path(results["dir"])
    assert stored.is_relative_to(site.cp.results_dir)

    printed = site.cp.run("results", "example-hr-flags-001")
    assert f"  {flags['sha256']}             8  flags.csv" in printed.stdout


def test_cancel_a_running_job(site: Site) -> None:
    job = site.tmp_path / "long.yaml"
    job.write_text(
        "job_id: long-1\nimage: {ref: 'cloudbender-test/busybox:latest'}\n"
        "datastore: vitals\ncommand: [sh, -c, 'sleep 3600']\n"
    )
    assert site.cp.run("submit", str(job), "--node", site.node_id).returncode == 0
    site.wait_state("long-1", "running")

    cancelled = site.cp.run("cancel", "long-1")
    assert cancelled.returncode == 0, cancelled.stderr
    assert "cancel sent" in cancelled.stdout

    watched = site.cp.run("watch", "long-1", "--timeout", str(seconds(30)))
    assert watched.returncode == 1
    assert "long-1: cancelled (cancel_requested" in watched.stdout
    assert [j["state"] for j in site.cp.json("jobs")["jobs"]] == ["cancelled"]


def test_a_malformed_job_file_never_reaches_the_agent(site: Site) -> None:
    """Attack: a job file with a misspelt limit (`cpu:`) that a lenient reader would
    drop, so that the job would run on the node without the limit its author wrote."""
    bad = site.tmp_path / "bad.yaml"
    bad.write_text(
        "job_id: typo-1\nimage: {ref: 'cloudbender-test/busybox:latest'}\n"
        "datastore: vitals\ncommand: [sh, -c, 'true']\nresources: {cpu: 1}\n"
    )
    done = site.cp.run("submit", str(bad), "--node", site.node_id)
    assert done.returncode == 65
    assert "resources.cpu: unknown key" in done.stderr
    assert site.cp.json("jobs")["jobs"] == []
    code, status = site.agent.get_json("/status")
    assert code == 200 and status["jobs"] == []
    assert "typo-1" not in site.agent.log()
