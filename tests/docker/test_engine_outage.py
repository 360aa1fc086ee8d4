"""The container engine goes away under a running job, and comes back.

On a private engine of the test's own (tests/helpers/private_engine.py): the main
engine, and every other test's containers on it, are never touched.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from tests.helpers.env import seconds
from tests.helpers.jobnode import JobNode, job_node
from tests.helpers.private_engine import PrivateEngine, private_engine

pytestmark = pytest.mark.docker


@pytest.fixture
def engine(test_image: str) -> Iterator[PrivateEngine]:
    with private_engine(test_image) as started:
        yield started


def _wait_event(node: JobNode, event: str, timeout: float) -> dict[str, object]:
    deadline = time.monotonic() + seconds(timeout)
    while time.monotonic() < deadline:
        found = [e for e in node.agent.log_events() if e.get("event") == event]
        if found:
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"no {event} within {timeout} s:\n{node.agent.log()[-4000:]}")


def test_engine_stopped_under_a_job(
    tmp_path: Path, engine: PrivateEngine, docker_client: docker.DockerClient
) -> None:
    """Attack: dockerd stops while a job runs (an upgrade, a crash, an OOM of dockerd).
    The agent used to say nothing for up to a minute, kept /healthz 200, accepted new
    jobs it could not run, blamed the provider's model (exit_nonzero for the 137 the
    engine dealt), and left the job's container behind until its next restart."""
    client = engine.client()
    with job_node(tmp_path, client, runtime={"docker_host": engine.host}) as node:
        node.assign("j-killed", "sleep 60")
        node.wait_state("j-killed", "running")
        node.wait_container("j-killed")

        stopped_at = time.monotonic()
        engine.stop()
        down = _wait_event(node, "engine_down", timeout=10)
        assert time.monotonic() - stopped_at < seconds(10)
        assert f"does not answer on {engine.host}" in str(down["error"])

        code, health = node.agent.get_json("/healthz")
        assert code == 503
        details = [p["detail"] for p in health["problems"]]
        assert f"the Docker engine does not answer on {engine.host}" in details, details
        _, status = node.agent.get_json("/status")  # what `cloudbender-agent status` shows
        assert status["healthy"] is False
        assert any(engine.host in p["detail"] for p in status["problems"]), status

        node.assign("j-new", "true")
        reply = node.reply("j-new")
        assert (reply["type"], reply.get("code")) == ("job.rejected", "runtime_unavailable")

        engine.start()
        _wait_event(node, "engine_up", timeout=10)
        end = node.wait_end("j-killed", timeout=30)
        assert (end["state"], end["reason"]) == ("failed", "container_lost"), node.agent.log()
        assert end.get("exit_code") in (None, 137, 143)
        deadline = time.monotonic() + seconds(10)
        while node.containers():
            assert time.monotonic() < deadline, "a labelled container is left behind"
            time.sleep(0.1)
        code, _ = node.agent.get_json("/healthz")
        assert code == 200
    # The main engine was never asked to do anything here.
    assert not docker_client.containers.list(
        all=True, filters={"label": "cloudbender.job-id=j-killed"}
    )
