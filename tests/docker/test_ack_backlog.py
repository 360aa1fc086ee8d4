"""Ended jobs waiting for ``job.ack`` are bounded: past the bound new jobs get ``no_capacity``.

Review item 6: a control plane that never acknowledges makes the agent keep every ended
job in memory, in the job store and in each ``hello``, without end. The node holds at
most ``4 * limits.max_concurrent_jobs`` of them (``agent.jobs.admission.node_refusal``).
"""

from __future__ import annotations

from pathlib import Path

import docker
import pytest

from agent.jobs.admission import ACK_BACKLOG_PER_SLOT
from tests.helpers.jobnode import job_node

pytestmark = pytest.mark.docker


def test_unacknowledged_ended_jobs_hold_back_new_ones_until_acked(
    tmp_path: Path, docker_client: docker.DockerClient, test_image: str
) -> None:
    """A control plane that never sends job.ack, to grow the agent's records without end."""
    with job_node(tmp_path, docker_client, limits={"max_concurrent_jobs": 1}) as node:
        ended = [f"j-{i}" for i in range(ACK_BACKLOG_PER_SLOT)]
        for job_id in ended:  # one slot: each ends before the next is assigned
            node.assign(job_id, "exit 1")
            assert node.wait_end(job_id)["reason"] == "exit_nonzero"
        node.assign("j-more", "exit 1")
        reply = node.reply("j-more")
        assert (reply["type"], reply["code"]) == ("job.rejected", "no_capacity"), reply
        assert "job.ack" in reply["detail"]
        assert node.states("j-more") == []
        listed = node.agent.get_json("/status")[1]["jobs"]
        assert sorted(j["job_id"] for j in listed) == ended

        node.cp.ack(node.node_id, ended[0])  # one acknowledged: room for one more
        node.assign("j-after", "exit 1")
        assert node.reply("j-after")["type"] == "job.accepted"
        assert node.wait_end("j-after")["reason"] == "exit_nonzero"
