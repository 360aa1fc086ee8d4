"""The local test image works the way job containers will use it."""

import docker
import pytest

from tests.helpers.env import seconds

pytestmark = pytest.mark.docker


def test_runs_as_nobody_with_writable_tmp_and_no_network(
    docker_client: docker.DockerClient, test_image: str
) -> None:
    container = docker_client.containers.create(
        test_image,
        ["sh", "-c", "id -u; echo hello > /tmp/x && cat /tmp/x"],
        user="65534:65534",
        network_mode="none",
        labels={"org.cloudbender.test": "test_test_image"},
    )
    try:
        container.start()
        result = container.wait(timeout=seconds(30))
        logs = container.logs().decode()
    finally:
        container.remove(force=True)

    assert result["StatusCode"] == 0, logs
    assert logs.split() == ["65534", "hello"]
