"""Fixtures for tests against the real Docker engine.

`make test` starts an engine if none runs and builds the local test images; these
fixtures fail (never skip) when either is missing, saying which command fixes it.
Images are never pulled: create containers with `containers.create`, not
`containers.run`, which pulls a missing image.
"""

from collections.abc import Iterator

import docker
import pytest
from docker.errors import DockerException, ImageNotFound

TEST_IMAGE = "cloudbender-test/busybox:latest"


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    try:
        client = docker.from_env()
        client.ping()
    except DockerException as exc:
        pytest.fail(
            f"no Docker engine ({exc}): `make test` starts one, "
            "or run `scripts/dockerd.sh up` before pytest",
            pytrace=False,
        )
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="session")
def test_image(docker_client: docker.DockerClient) -> str:
    try:
        docker_client.images.get(TEST_IMAGE)
    except ImageNotFound:
        pytest.fail(
            f"the local test image {TEST_IMAGE} is missing: run `make images` "
            "(it is built from Debian's busybox-static, never pulled)",
            pytrace=False,
        )
    return TEST_IMAGE
