"""hello.inventory.runtime reports the real engine this node runs."""

from __future__ import annotations

from pathlib import Path

import docker
import pytest

from agent.controlplane import ThreadedControlPlane
from tests.helpers.env import seconds, valid_config, write_config
from tests.helpers.proc import running_agent

pytestmark = pytest.mark.docker

TOKEN = "s3cr3t-token-for-tests-0123456789"


def test_hello_names_the_docker_engine_version(
    tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    cp = ThreadedControlPlane(tokens={TOKEN: "*"})
    cp.start()
    try:
        config = valid_config(tmp_path)
        config["control_plane"]["url"] = cp.url
        port = int(config["health"]["listen"].rsplit(":", 1)[1])
        with running_agent(write_config(tmp_path, config), port, tmp_path) as agent:
            node = cp.wait_for_node("test-node", timeout=seconds(20))
            assert node.hello is not None
            runtime = node.hello["inventory"]["runtime"]
            assert runtime == {
                "engine": "docker",
                "version": docker_client.version()["Version"],
                "gpu_support": False,
            }
            assert agent.stop()[0] == 0
    finally:
        cp.stop()
