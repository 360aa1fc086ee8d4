"""New jobs are refused no_space when the state directory is under its free-space floor."""

from __future__ import annotations

from pathlib import Path

import docker
import pytest

from tests.helpers.jobnode import job_node

pytestmark = pytest.mark.docker


def test_a_node_under_its_disk_floor_refuses_new_jobs_no_space(
    tmp_path: Path, docker_client: docker.DockerClient, test_image: str
) -> None:
    """A job accepted on a nearly full disk fails late, after its image and model were
    fetched; the node says no at once instead, naming the key that sets the floor."""
    floor = 10**9  # MiB: more than any disk this test runs on
    with job_node(tmp_path, docker_client, limits={"min_free_mib": floor}) as node:
        node.assign("j-full", "echo hi > /opt/output/a.txt")
        reply = node.reply("j-full")
        assert (reply["type"], reply["code"]) == ("job.rejected", "no_space"), reply
        assert "limits.min_free_mib" in reply["detail"]
        assert str(tmp_path) not in reply["detail"]
        assert node.containers() == []
