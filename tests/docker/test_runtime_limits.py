"""On the real engine: a container whose CPU or memory limit means "none" is never started.

Review item 4: ``resources.cpus: 1e-10`` became ``nano_cpus=0``, which Docker reads as
no CPU limit (the job used 1.6 cores on a node capped at 1), and the read-back
verification passed because the engine reported exactly what had been asked. Here the
spec check is bypassed on purpose (the create arguments are built as they were before
PROTOCOL.md 1.1, from a spec asking for the limit that means none), so that the
read-back of what the engine created is the last line, and it must hold.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import docker
import pytest

from agent.errors import InvalidContainerSpec, IsolationMismatch
from agent.runtime import docker as docker_runtime
from agent.runtime.base import ContainerSpec
from agent.runtime.docker import DockerRuntime
from agent.runtime.spec import MIB, create_kwargs

pytestmark = pytest.mark.docker

SpecFactory = Callable[..., ContainerSpec]


def _unchecked_kwargs(spec: ContainerSpec, gpu_path: str = "legacy") -> dict[str, Any]:
    """``create_kwargs`` without the spec check: the limits go to the engine as asked."""
    kwargs = create_kwargs(replace(spec, cpus=1.0, memory_mib=64), gpu_path)
    kwargs["nano_cpus"] = round(spec.cpus * 1e9)
    kwargs["mem_limit"] = kwargs["memswap_limit"] = spec.memory_mib * MIB
    return kwargs


@pytest.mark.parametrize(
    ("changes", "words"),
    [({"cpus": 1e-10}, "NanoCpus is 0"), ({"memory_mib": 0}, "Memory is 0")],
    ids=["nano-cpus-0", "memory-0"],
)
def test_a_container_without_a_real_limit_is_removed_unstarted(
    runtime: DockerRuntime,
    docker_client: docker.DockerClient,
    job_spec: SpecFactory,
    monkeypatch: pytest.MonkeyPatch,
    changes: dict[str, Any],
    words: str,
) -> None:
    """The engine is asked for NanoCpus 0 (or Memory 0) and reports it back faithfully:
    the verification refuses it by SECURITY.md §1 (a positive limit), and the container
    is removed before it ever starts."""
    spec = job_spec("echo ran > /opt/output/ran.txt", **changes)
    with pytest.raises(InvalidContainerSpec):  # the first line: the spec check
        runtime.create(spec)
    monkeypatch.setattr(docker_runtime, "create_kwargs", _unchecked_kwargs)
    with pytest.raises(IsolationMismatch) as info:
        runtime.create(spec)
    assert any(words in p for p in info.value.problems), info.value.problems
    name = f"cb-{spec.node_id}-{spec.job_id}"
    assert [c for c in docker_client.containers.list(all=True) if c.name == name] == []
