"""The post-start GPU device check (agent.runtime.gpucheck) on the real engine.

No GPU here: a "lease" is a made-up UUID mapped to a minor number, and a container's
access to /dev/nvidia<N> is granted with a device cgroup rule (``c 195:N rwm``), which
is what the toolkit's hook adds for a GPU it hands over. cgroup v1 only: on v2 the
device list is an eBPF program and the check reads the container's /dev instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import docker
import pytest

from agent.errors import ContainerStartError
from agent.runtime.base import LABEL_MANAGED, LABEL_NODE_ID, ContainerSpec
from agent.runtime.docker import DockerRuntime
from agent.runtime.gpucheck import container_access

pytestmark = pytest.mark.docker

FAKE_GPU = "GPU-00000000-fake-lease-0000-000000000000"
HOST = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")


def cgroup_v1(client: docker.DockerClient) -> bool:
    return str(client.info().get("CgroupVersion")) == "1"


def sleeper(client: docker.DockerClient, node_id: str, lease: str, rules: list[str]) -> str:
    """A running-to-be container of ``node_id`` whose lease is ``lease``, granted the
    device cgroup ``rules``; created raw because the runtime refuses GPU jobs here."""
    container = client.containers.create(
        "cloudbender-test/busybox:latest",
        ["sleep", "60"],
        environment={"NVIDIA_VISIBLE_DEVICES": lease},
        labels={LABEL_MANAGED: "true", LABEL_NODE_ID: node_id},
        network_mode="none",
        device_cgroup_rules=rules,
    )
    return str(container.id)


def test_a_job_without_gpus_has_no_nvidia_device(
    runtime: DockerRuntime,
    job_spec: Callable[..., ContainerSpec],
    docker_client: docker.DockerClient,
) -> None:
    """Attack: a job with no GPU leased must not be able to open any NVIDIA device
    (the default nvidia runtime or an image's NVIDIA_VISIBLE_DEVICES=all would)."""
    cid = runtime.create(job_spec("sleep 60"))
    runtime.start(cid)  # passes the check: no GPU leased, none open
    pid = docker_client.api.inspect_container(cid)["State"]["Pid"]
    access = container_access(pid)
    assert access is not None, "the container's device access could not be read"
    if cgroup_v1(docker_client):
        assert access.source.endswith("devices.list")
    assert (access.minors, access.all_gpus) == (frozenset(), False)
    runtime.remove(cid)


def test_a_job_whose_container_lacks_its_leased_gpu_fails_to_start(
    docker_client: docker.DockerClient, node_id: str
) -> None:
    """Attack: the toolkit ignored the lease (envvar-when-unprivileged = false, a stale
    CDI spec): the container starts without its GPU and the job would run on the CPU."""
    if not cgroup_v1(docker_client):
        pytest.skip("the device cgroup rule test needs cgroup v1 (v2 reads /dev nodes)")
    runtime = DockerRuntime(HOST, gpu_minors=lambda: {FAKE_GPU: 0})
    cid = sleeper(docker_client, node_id, FAKE_GPU, [])
    with pytest.raises(ContainerStartError) as caught:
        runtime.start(cid)
    assert f"leased GPU {FAKE_GPU} (/dev/nvidia0) is missing" in str(caught.value)
    assert docker_client.api.inspect_container(cid)["State"]["Running"] is False


def test_a_container_with_another_gpu_fails_and_one_with_its_own_starts(
    docker_client: docker.DockerClient, node_id: str
) -> None:
    """Attack: a container given a GPU it did not lease (another job's) must not run;
    one that got exactly its GPU must (the check does not refuse every GPU job)."""
    if not cgroup_v1(docker_client):
        pytest.skip("the device cgroup rule test needs cgroup v1 (v2 reads /dev nodes)")
    runtime = DockerRuntime(HOST, gpu_minors=lambda: {FAKE_GPU: 0, "GPU-other": 1})
    wrong = sleeper(docker_client, node_id, FAKE_GPU, ["c 195:1 rwm", "c 195:255 rwm"])
    with pytest.raises(ContainerStartError) as caught:
        runtime.start(wrong)
    assert "/dev/nvidia1 (GPU-other) is open to the container, not leased" in str(caught.value)
    right = sleeper(docker_client, node_id, FAKE_GPU, ["c 195:0 rwm", "c 195:255 rwm"])
    runtime.start(right)
    assert docker_client.api.inspect_container(right)["State"]["Running"] is True
    runtime.remove(right)
