"""Issue 12, reload that keeps its word: a real SIGHUP to a real daemon, then the next
job shows the new value (the job user it runs as, the images and digest it may use,
the result cap it is held to)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import docker
import pytest
import yaml

from tests.helpers.env import seconds, write_config
from tests.helpers.jobnode import JobNode, job_node

pytestmark = pytest.mark.docker

MIB = 1024 * 1024


def _reload(node: JobNode, **sections: dict[str, object]) -> None:
    """Amend the node's config per section, SIGHUP it, wait for the reload's log line."""
    config = yaml.safe_load(node.config_path.read_text())
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    before = node.agent.log().count("config_reloaded")
    write_config(node.tmp_path, config)
    node.agent.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + seconds(10)
    while node.agent.log().count("config_reloaded") <= before:
        assert time.monotonic() < deadline, node.agent.log()[-3000:]
        time.sleep(0.05)


def test_sighup_job_user_runs_the_next_job_as_the_new_user(
    tmp_path: Path, docker_client: docker.DockerClient, test_image: str
) -> None:
    """Attack (issue 12): runtime.job_user changed and SIGHUP said "applied", yet the
    next job still ran as the start-up uid and wrote its results as that uid."""
    with job_node(tmp_path, docker_client) as node:
        _reload(node, runtime={"job_user": "4321:4321"})
        node.assign("j-uid", "id -u > /opt/output/uid.txt; id -g >> /opt/output/uid.txt")
        end = node.wait_end("j-uid")
        assert end["state"] == "succeeded", node.agent.log()[-3000:]
        assert node.result("j-uid", "uid.txt").split() == [b"4321", b"4321"]


def test_sighup_images_digest_and_result_cap_hold_for_the_next_job(
    tmp_path: Path, docker_client: docker.DockerClient, test_image: str
) -> None:
    """Attack: a consumer narrows what may run (runtime.allowed_images,
    runtime.require_digest) or how much may leave (results.max_bytes) by SIGHUP; each
    must hold for the very next assignment, not after a restart."""
    with job_node(tmp_path, docker_client) as node:
        _reload(node, runtime={"allowed_images": ["other-provider/*"]})
        node.assign("j-image", "true")
        reply = node.reply("j-image")
        assert (reply["type"], reply["code"]) == ("job.rejected", "image_not_allowed"), reply

        _reload(node, runtime={"allowed_images": ["cloudbender-test/*"], "require_digest": True})
        node.assign("j-digest", "true")
        reply = node.reply("j-digest")
        assert reply["type"] == "job.rejected" and "require_digest" in reply["detail"], reply

        _reload(node, runtime={"require_digest": False}, results={"max_bytes": MIB})
        node.assign("j-cap", "dd if=/dev/zero of=/opt/output/a bs=1024 count=1536 2>/dev/null")
        end = node.wait_end("j-cap")
        assert (end["state"], end["reason"]) == ("failed", "result_too_large"), end
