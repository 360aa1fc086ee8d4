"""The ``runtime`` fixture of the contract suite: one harness per backend.

Each harness gives the same test the same powers on both backends: a spec factory
whose job *does* something (exits with a code, writes outputs, runs until stopped, is
OOM-killed, cannot start), and ``restart()``, a new runtime client on the same engine
(what the agent has after a restart). On Docker a job's behaviour is a shell line in
the local test image; on the fake it is a :class:`~agent.runtime.fake.Behaviour`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from agent.runtime.base import ContainerSpec, Runtime
from agent.runtime.fake import FakeEngine, FakeRuntime
from tests.docker.conftest import (  # noqa: F401  (fixtures the docker backend uses)
    JOB_UID,
    TEST_IMAGE,
    JobDirs,
    docker_client,
    job_dirs,
    node_id,
    test_image,
)

SpecFactory = Callable[..., ContainerSpec]


@dataclass
class Harness:
    """One backend: ``runtime``, ``job`` (a spec factory), ``restart`` and
    ``break_start`` (make the next ``start`` of this spec fail as the engine would)."""

    name: str
    runtime: Runtime
    job: Callable[..., ContainerSpec]
    restart: Callable[[], Runtime]
    break_start: Callable[[ContainerSpec], None]
    created: list[str]

    def create(self, spec: ContainerSpec) -> str:
        cid = self.runtime.create(spec)
        self.created.append(cid)
        return cid


def _script(exit_code: int, outputs: dict[str, bytes], forever: bool, oom: bool) -> str:
    if oom:
        return "head -c 200m /dev/zero | tail > /dev/null"
    writes = "".join(f"printf '%s' '{v.decode()}' > /opt/output/{k}; " for k, v in outputs.items())
    if forever:
        return "exec sleep 600"
    return f"{writes}exit {exit_code}"


def _spec(
    job_id: str,
    node: str,
    image: str,
    image_id: str,
    dirs: JobDirs,
    script: str,
    changes: dict[str, Any],
) -> ContainerSpec:
    fields: dict[str, Any] = {
        "job_id": job_id,
        "node_id": node,
        "image": image,
        "image_id": image_id,
        "command": ["sh", "-c", script],
        "env": {},
        "user": f"{JOB_UID}:{JOB_UID}",
        "data_dir": dirs.data,
        "model_dir": dirs.model,
        "output_dir": dirs.output,
        "cpus": 0.5,
        "memory_mib": 64,
        "pids": 64,
        "tmp_mib": 16,
    }
    return ContainerSpec(**{**fields, **changes})


@pytest.fixture(params=["fake", pytest.param("docker", marks=pytest.mark.docker)])
def runtime(request: pytest.FixtureRequest) -> Iterator[Harness]:
    """The runtime under contract, on each backend; every container a test made through
    ``Harness.create`` is removed afterwards (and on Docker every one of its node)."""
    dirs: JobDirs = request.getfixturevalue("job_dirs")
    counter = iter(range(1, 1000))
    created: list[str] = []
    if request.param == "fake":
        engine = FakeEngine()
        fake_image = engine.add_image(TEST_IMAGE)

        def fake_job(
            exit_code: int = 0,
            outputs: dict[str, bytes] | None = None,
            forever: bool = False,
            oom: bool = False,
            **changes: Any,
        ) -> ContainerSpec:
            job_id = f"j-{next(counter)}"
            run_s = None if forever else 0.0
            engine.behave(job_id, exit_code=exit_code, outputs=outputs or {}, run_s=run_s, oom=oom)
            return _spec(job_id, "test-fake", TEST_IMAGE, fake_image, dirs, "true", changes)

        def fake_break(spec: ContainerSpec) -> None:
            engine.behave(spec.job_id, start_error="OCI runtime create failed")

        yield Harness(
            "fake", FakeRuntime(engine), fake_job, lambda: FakeRuntime(engine), fake_break, created
        )
        return

    from agent.runtime.docker import DockerRuntime

    request.getfixturevalue("test_image")
    node: str = request.getfixturevalue("node_id")
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    real = DockerRuntime(host)
    real_image = real.image_id(TEST_IMAGE, None)
    assert real_image is not None

    def docker_job(
        exit_code: int = 0,
        outputs: dict[str, bytes] | None = None,
        forever: bool = False,
        oom: bool = False,
        **changes: Any,
    ) -> ContainerSpec:
        script = _script(exit_code, outputs or {}, forever, oom)
        return _spec(f"j-{next(counter)}", node, TEST_IMAGE, real_image, dirs, script, changes)

    def docker_break(spec: ContainerSpec) -> None:
        # A bind source that vanished between create and start: the engine refuses to
        # start it, as it does on an OCI runtime error or a missing GPU driver.
        shutil.rmtree(spec.data_dir)

    try:
        yield Harness(
            "docker", real, docker_job, lambda: DockerRuntime(host), docker_break, created
        )
    finally:
        for cid in created:
            real.remove(cid)
