"""Fixtures for tests against the real Docker engine.

`make test` starts an engine if none runs and builds the local test images; these
fixtures fail (never skip) when either is missing, saying which command fixes it.
Images are never pulled: create containers with `containers.create`, not
`containers.run`, which pulls a missing image.
"""

import ipaddress
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import pytest
from docker.errors import DockerException, ImageNotFound, NotFound

from agent.runtime.base import ContainerSpec
from agent.runtime.docker import DockerRuntime
from tests.helpers.jobnode import JobNode, job_node

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


# --- job containers (agent.runtime) -------------------------------------------------

JOB_UID = 65534


@pytest.fixture
def runtime(docker_client: docker.DockerClient) -> DockerRuntime:
    """The agent's runtime on the engine that `docker_client` talks to."""
    return DockerRuntime(os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock"))


@pytest.fixture
def node_id(docker_client: docker.DockerClient) -> Iterator[str]:
    """A node id of this test's own; every container labelled with it is removed
    afterwards, whatever the test did or failed to do."""
    node = f"test-{uuid.uuid4().hex[:10]}"
    try:
        yield node
    finally:
        leftovers = docker_client.containers.list(
            all=True, filters={"label": f"cloudbender.node-id={node}"}
        )
        for container in leftovers:
            container.remove(force=True, v=True)


@dataclass(frozen=True)
class JobDirs:
    data: Path
    model: Path
    output: Path


@pytest.fixture
def job_dirs(tmp_path: Path) -> JobDirs:
    """A datastore (with one file), a model dir and an output dir owned by the job user,
    as the job manager must prepare them (docs/runtime.md)."""
    dirs = JobDirs(tmp_path / "data", tmp_path / "model", tmp_path / "output")
    for path in (dirs.data, dirs.model, dirs.output):
        path.mkdir()
        path.chmod(0o755)
    (dirs.data / "vitals.csv").write_text("hr,spo2\n80,97\n")
    (dirs.model / "weights.bin").write_bytes(b"\0" * 16)
    os.chown(dirs.output, JOB_UID, JOB_UID)
    return dirs


@pytest.fixture
def job_spec(
    runtime: DockerRuntime, test_image: str, node_id: str, job_dirs: JobDirs
) -> Callable[..., ContainerSpec]:
    """A factory of specs for this test's node: small limits, the test image, the
    test's job dirs; keyword arguments replace fields (`command` is a shell line)."""
    image_id = runtime.image_id(test_image, None)
    assert image_id is not None
    counter = iter(range(1, 1000))

    def make(script: str = "true", **changes: Any) -> ContainerSpec:
        fields: dict[str, Any] = {
            "job_id": f"j-{next(counter)}",
            "node_id": node_id,
            "image": test_image,
            "image_id": image_id,
            "command": ["sh", "-c", script],
            "env": {},
            "user": f"{JOB_UID}:{JOB_UID}",
            "data_dir": job_dirs.data,
            "model_dir": job_dirs.model,
            "output_dir": job_dirs.output,
            "cpus": 0.5,
            "memory_mib": 64,
            "pids": 64,
            "tmp_mib": 16,
        }
        fields.update(changes)
        return ContainerSpec(**fields)

    return make


def bridge_gateway(client: docker.DockerClient) -> str:
    """The host's address on Docker's default bridge (where a job on that bridge would
    reach the host).

    An engine started for the first time reports only the bridge's ``Subnet`` in its IPAM
    config, without ``Gateway``; the gateway is then the subnet's first host address, as
    dockerd assigns it to ``docker0``.
    """
    try:
        configs = client.networks.get("bridge").attrs["IPAM"]["Config"] or []
    except NotFound:
        configs = []
    ipv4 = [c for c in configs if ":" not in str(c.get("Subnet", ":"))]
    if not ipv4:
        pytest.fail(
            "the Docker engine has no default bridge network with an IPv4 subnet "
            "(dockerd started with --bridge=none?); the egress tests need one to prove a "
            "job cannot reach the host through it",
            pytrace=False,
        )
    gateway = ipv4[0].get("Gateway")
    if gateway:
        return str(gateway)
    return str(next(ipaddress.ip_network(ipv4[0]["Subnet"], strict=False).hosts()))


@pytest.fixture
def node(tmp_path: Path, docker_client: docker.DockerClient, test_image: str) -> Iterator[JobNode]:
    """The reference control plane and a real agent process on loopback, with the
    default job-node config (tests/helpers/jobnode.py)."""
    with job_node(tmp_path, docker_client) as n:
        yield n
