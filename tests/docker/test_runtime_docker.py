"""DockerRuntime on the real engine: lifecycle, failures, images, engine facts.

Every container is created through the runtime (never `containers.run`, which
pulls) and removed by the test or, whatever happens, by the `node_id` fixture.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import docker
import pytest
import structlog

from agent.errors import (
    ContainerCreateError,
    ContainerExists,
    ContainerNotFound,
    GpuUnsupported,
    ImageDigestMismatch,
    ImageNotFound,
    ImagePullFailed,
    IsolationMismatch,
    RuntimeUnavailable,
    WaitTimeout,
)
from agent.runtime.base import ContainerSpec
from agent.runtime.docker import DockerRuntime
from tests.docker.conftest import JobDirs
from tests.helpers.env import free_port, seconds

pytestmark = pytest.mark.docker

SpecFactory = Callable[..., ContainerSpec]
GPU = "GPU-5a1c3f0e-1111-2222-3333-444455556666"


@pytest.fixture
def run_job(runtime: DockerRuntime) -> Iterator[Callable[..., str]]:
    """Create and start a job container (removed afterwards, whatever happens)."""
    ids: list[str] = []

    def run(spec: ContainerSpec) -> str:
        cid = runtime.create(spec)
        ids.append(cid)
        runtime.start(cid)
        return cid

    try:
        yield run
    finally:
        for cid in ids:
            runtime.remove(cid)


def _wait_for_file(path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


# --- lifecycle ----------------------------------------------------------------------


def test_wait_returns_the_exit_code(
    runtime: DockerRuntime, job_spec: SpecFactory, run_job: Callable[..., str]
) -> None:
    cid = run_job(job_spec("echo partial > /opt/output/r.txt; exit 3"))
    state = runtime.wait(cid, seconds(30))
    assert (state.status, state.running, state.exit_code, state.oom_killed) == (
        "exited",
        False,
        3,
        False,
    )
    assert state.started_at is not None and state.finished_at is not None
    # dockerd stamps StartedAt after runc reports the start; a job that exits at once can
    # finish a fraction of a millisecond "before" it started (seen in CI).
    assert state.finished_at >= state.started_at - timedelta(milliseconds=50)


def test_wait_gives_up_after_its_timeout_and_the_job_keeps_running(
    runtime: DockerRuntime, job_spec: SpecFactory, run_job: Callable[..., str]
) -> None:
    cid = run_job(job_spec("sleep 60"))
    started = time.monotonic()
    with pytest.raises(WaitTimeout):
        runtime.wait(cid, 1)
    assert time.monotonic() - started < seconds(10)
    assert runtime.inspect(cid).running is True  # type: ignore[union-attr]


def test_a_job_over_its_memory_limit_is_oom_killed(
    runtime: DockerRuntime, job_spec: SpecFactory, run_job: Callable[..., str]
) -> None:
    # tail keeps a line that never ends in memory: 200 MiB against a 32 MiB limit, no swap.
    cid = run_job(job_spec("head -c 200m /dev/zero | tail > /dev/null", memory_mib=32))
    state = runtime.wait(cid, seconds(60))
    assert state.oom_killed is True
    assert state.exit_code != 0


def test_stop_sends_term_then_kills_after_the_grace_period(
    runtime: DockerRuntime, job_spec: SpecFactory, job_dirs: JobDirs, run_job: Callable[..., str]
) -> None:
    log = job_dirs.output / "stop.log"
    cid = run_job(
        job_spec(
            "trap 'echo term >> /opt/output/stop.log' TERM; "
            "echo started >> /opt/output/stop.log; while true; do sleep 0.1; done"
        )
    )
    _wait_for_file(log, seconds(30))
    grace = 2.0
    started = time.monotonic()
    runtime.stop(cid, grace_s=grace)
    took = time.monotonic() - started
    state = runtime.inspect(cid)
    assert state is not None and state.running is False
    assert state.exit_code == 137  # SIGKILL
    assert took >= grace
    assert took < grace + seconds(10)
    assert log.read_text().split() == ["started", "term"]  # TERM came first


def test_stop_returns_as_soon_as_the_job_exits_on_term(
    runtime: DockerRuntime, job_spec: SpecFactory, run_job: Callable[..., str]
) -> None:
    cid = run_job(job_spec("exec sleep 600"))
    time.sleep(seconds(0.3))
    started = time.monotonic()
    runtime.stop(cid, grace_s=30)
    assert time.monotonic() - started < seconds(10)
    state = runtime.inspect(cid)
    assert state is not None and state.exit_code == 143  # SIGTERM
    runtime.stop(cid, grace_s=30)  # stopping a stopped container does nothing


def test_list_jobs_finds_this_nodes_containers_by_label(
    runtime: DockerRuntime,
    job_spec: SpecFactory,
    docker_client: docker.DockerClient,
    node_id: str,
) -> None:
    mine = [runtime.create(job_spec()) for _ in range(2)]
    other = runtime.create(job_spec(node_id=f"{node_id}-other"))
    try:
        runtime.start(mine[0])
        runtime.wait(mine[0], seconds(30))
        found = {s.id: s for s in runtime.list_jobs(node_id)}
        assert set(found) == set(mine)
        assert found[mine[0]].status == "exited" and found[mine[0]].exit_code == 0
        assert found[mine[1]].status == "created" and found[mine[1]].exit_code is None
        assert {s.job_id for s in found.values()} == {"j-1", "j-2"}
        assert runtime.list_jobs(f"{node_id}-nobody") == []
    finally:
        for cid in [*mine, other]:
            runtime.remove(cid)
    assert runtime.list_jobs(node_id) == []


def test_remove_is_idempotent_and_a_removed_container_is_gone(
    runtime: DockerRuntime, job_spec: SpecFactory
) -> None:
    cid = runtime.create(job_spec("sleep 60"))
    runtime.start(cid)
    runtime.remove(cid)  # running: killed and removed
    runtime.remove(cid)
    runtime.remove("no-such-container")
    assert runtime.inspect(cid) is None
    for call in (
        lambda: runtime.start(cid),
        lambda: runtime.stop(cid, 1),
        lambda: runtime.wait(cid, 5),
        lambda: runtime.applied_isolation(cid),
    ):
        with pytest.raises(ContainerNotFound):
            call()


def test_applied_isolation_is_what_the_engine_reports_without_host_paths(
    runtime: DockerRuntime, job_spec: SpecFactory, job_dirs: JobDirs
) -> None:
    cid = runtime.create(job_spec())
    try:
        summary = runtime.applied_isolation(cid)
    finally:
        runtime.remove(cid)
    assert summary["host_config"]["NetworkMode"] == "none"
    assert summary["host_config"]["CapDrop"] == ["ALL"]
    assert [m["target"] for m in summary["mounts"]] == ["/opt/data", "/opt/model", "/opt/output"]
    assert str(job_dirs.data) not in json.dumps(summary)


# --- create refuses -------------------------------------------------------------------


def _containers_named(client: docker.DockerClient, name: str) -> list[object]:
    return [c for c in client.containers.list(all=True) if c.name == name]


def test_a_second_container_for_the_same_job_is_refused(
    runtime: DockerRuntime, job_spec: SpecFactory
) -> None:
    spec = job_spec()
    cid = runtime.create(spec)
    try:
        with pytest.raises(ContainerExists):
            runtime.create(spec)
    finally:
        runtime.remove(cid)


def test_a_container_that_differs_from_the_checklist_is_removed_unstarted(
    runtime: DockerRuntime,
    docker_client: docker.DockerClient,
    job_spec: SpecFactory,
    test_image: str,
) -> None:
    # An image VOLUME gives the job a writable, unbounded mount that nobody asked for.
    base = docker_client.containers.create(test_image, ["true"])
    image = base.commit(
        repository="cloudbender-test/with-volume", tag=base.id[:12], changes=["VOLUME /scratch"]
    )
    base.remove()
    spec = job_spec(image_id=image.id)
    try:
        with pytest.raises(IsolationMismatch) as info:
            runtime.create(spec)
        assert any("/scratch" in p and "VOLUME" in p for p in info.value.problems)
        assert _containers_named(docker_client, f"cb-{spec.node_id}-{spec.job_id}") == []
    finally:
        docker_client.images.remove(image.id, force=True)


def test_create_never_pulls(runtime: DockerRuntime, job_spec: SpecFactory) -> None:
    with pytest.raises(ImageNotFound):
        runtime.create(job_spec(image_id="sha256:" + "0" * 64))


def test_a_gpu_job_is_refused_clearly_without_nvidia_support(
    runtime: DockerRuntime, docker_client: docker.DockerClient, job_spec: SpecFactory
) -> None:
    spec = job_spec(gpu_uuids=(GPU,))
    with pytest.raises(GpuUnsupported, match="NVIDIA container toolkit"):
        runtime.create(spec)
    assert _containers_named(docker_client, f"cb-{spec.node_id}-{spec.job_id}") == []


def test_a_runtime_the_engine_lacks_is_refused(
    runtime: DockerRuntime, job_spec: SpecFactory
) -> None:
    with pytest.raises(ContainerCreateError, match="runtime 'runsc' is not configured"):
        runtime.create(job_spec(runtime="runsc"))


def test_missing_bind_sources_are_refused(
    runtime: DockerRuntime, job_spec: SpecFactory, tmp_path: Path
) -> None:
    with pytest.raises(ContainerCreateError, match="does not exist"):
        runtime.create(job_spec(data_dir=tmp_path / "gone"))


# --- engine facts ---------------------------------------------------------------------


def test_info_reports_the_engine(
    runtime: DockerRuntime, docker_client: docker.DockerClient
) -> None:
    info = runtime.info()
    assert info.reachable is True and info.error is None
    assert info.version == docker_client.version()["Version"]
    assert info.gpu_support is False  # no NVIDIA runtime, no CDI spec on this machine
    assert info.to_dict() == {"engine": "docker", "version": info.version, "gpu_support": False}


def test_gpu_support_is_detected_from_an_nvidia_cdi_spec(tmp_path: Path) -> None:
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    spec = "cdiVersion: 0.5.0\nkind: nvidia.com/gpu\ndevices:\n- name: GPU-0a1b\n"
    (tmp_path / "nvidia.yaml").write_text(spec)
    assert DockerRuntime(host, cdi_dirs=[tmp_path]).info().gpu_support is True
    (tmp_path / "empty").mkdir()
    assert DockerRuntime(host, cdi_dirs=[tmp_path / "empty"]).info().gpu_support is False


def test_an_unreachable_engine_is_reported_not_raised(
    tmp_path: Path, job_spec: SpecFactory
) -> None:
    runtime = DockerRuntime(f"unix://{tmp_path}/no-docker.sock", timeout_s=5)
    info = runtime.info()
    assert (info.reachable, info.version, info.gpu_support) == (False, None, False)
    assert info.error and "does not answer" in info.error
    with pytest.raises(RuntimeUnavailable):
        runtime.create(job_spec())
    with pytest.raises(RuntimeUnavailable):
        runtime.list_jobs("x")


# --- images ---------------------------------------------------------------------------


def test_image_id_looks_up_local_images_only(
    runtime: DockerRuntime, docker_client: docker.DockerClient, test_image: str
) -> None:
    assert runtime.image_id(test_image, None) == docker_client.images.get(test_image).id
    assert runtime.image_id("cloudbender-test/not-here:1", None) is None
    assert runtime.image_id("cloudbender-test/not-here:1", "sha256:" + "1" * 64) is None


def test_a_local_image_without_the_pinned_digest_is_a_mismatch(
    runtime: DockerRuntime, test_image: str
) -> None:
    # Built locally, the test image has no registry digest at all: nothing can prove it.
    with pytest.raises(ImageDigestMismatch, match="the job pins sha256:1111"):
        runtime.image_id(test_image, "sha256:" + "1" * 64)


def test_a_pull_from_an_unreachable_registry_fails_clearly_and_keeps_secrets(
    runtime: DockerRuntime,
) -> None:
    ref = f"127.0.0.1:{free_port()}/x:1"  # a closed port: nothing leaves the machine
    password = "s3cret-registry-pass-0123"
    started = time.monotonic()
    with structlog.testing.capture_logs() as logs, pytest.raises(ImagePullFailed) as info:
        runtime.pull(ref, None, {"username": "u", "password": password}, timeout_s=seconds(30))
    assert time.monotonic() - started < seconds(30)
    message = str(info.value)
    assert ref in message and "connection refused" in message.lower()
    assert password not in message and password not in repr(logs)
    assert info.value.__cause__ is None


class SilentRegistry:
    """Accepts connections and never answers: a registry that hangs."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                self.conns.append(self.sock.accept()[0])
            except OSError:
                return

    def close(self) -> None:
        self.sock.close()
        for conn in self.conns:
            conn.close()


def test_a_pull_gives_up_at_its_deadline(runtime: DockerRuntime) -> None:
    registry = SilentRegistry()
    try:
        started = time.monotonic()
        with pytest.raises(ImagePullFailed, match="did not finish within 2 s"):
            runtime.pull(f"127.0.0.1:{registry.port}/x:1", None, None, timeout_s=2)
        assert time.monotonic() - started < 2 + seconds(3)
        assert registry.conns, "the engine never tried the registry"
    finally:
        registry.close()
