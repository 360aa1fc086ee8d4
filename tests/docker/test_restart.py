"""An agent restart loses nothing: jobs re-adopted, vanished ones reported, strays reaped."""

from __future__ import annotations

import time
from pathlib import Path

import docker
import pytest

from tests.helpers.jobnode import IMAGE, job_node

pytestmark = pytest.mark.docker


def test_running_job_survives_an_agent_restart(
    tmp_path: Path, docker_client: docker.DockerClient, test_image: str
) -> None:
    with job_node(tmp_path, docker_client) as node:
        node.assign("j-long", "sleep 4; echo done > /opt/output/result.txt")
        node.wait_state("j-long", "running")
        before = node.wait_container("j-long")
        node.restart_agent()
        # The container was not touched by the stop: the same one is still there.
        assert [c.id for c in node.containers("j-long")] == [before.id]
        end = node.wait_end("j-long", timeout=60)
        assert end["state"] == "succeeded", node.agent.log()
        assert end["reason"] == "completed"
        states = node.states("j-long")
        assert states.count("succeeded") == 1
        assert "failed" not in states


def test_container_removed_while_the_agent_was_down_is_lost(
    tmp_path: Path, docker_client: docker.DockerClient, test_image: str
) -> None:
    with job_node(tmp_path, docker_client) as node:
        node.assign("j-gone", "sleep 60")
        node.wait_state("j-gone", "running")
        container = node.wait_container("j-gone")
        node.restart_agent(between=lambda: container.remove(force=True))
        end = node.wait_end("j-gone", timeout=30)
        assert (end["state"], end["reason"]) == ("failed", "container_lost")


def test_stray_job_container_is_reaped(
    tmp_path: Path, docker_client: docker.DockerClient, test_image: str
) -> None:
    with job_node(tmp_path, docker_client) as node:

        def plant() -> None:
            docker_client.containers.create(
                IMAGE,
                ["sleep", "60"],
                labels={
                    "cloudbender.managed": "true",
                    "cloudbender.node-id": node.node_id,
                    "cloudbender.job-id": "j-nobody-knows",
                },
                network_mode="none",
            ).start()

        node.restart_agent(between=plant)
        node.agent.wait_answering()
        deadline = time.monotonic() + 20
        while node.containers("j-nobody-knows") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert node.containers("j-nobody-knows") == []
