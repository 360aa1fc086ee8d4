"""GPU leases over inventories from the real NVML backend on FakeNvml: jobs get whole,
healthy, offered GPUs of the right type, never shared, all or nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent.config import parse_config
from agent.gpu.base import GpuInventory, mark_allocatable
from agent.gpu.nvml import NvmlBackend
from agent.jobs.admission import Admitted, admit
from agent.jobs.gpus import GpuLeases
from agent.protocol.messages import JobAssign
from tests.fakes.nvml import FakeGpu, FakeNvml, two_gpu_fake
from tests.helpers.env import valid_config

UUID0 = "GPU-5e3c8a52-1a4f-4b0e-9f7d-3c2b1a0e9d01"
UUID1 = "GPU-9b1d7e44-6c2a-4e8f-8a3b-5d4c3b2a1f02"
H100 = "NVIDIA H100 80GB HBM3"
A100 = "NVIDIA A100-SXM4-80GB"


def inventory(backend: NvmlBackend, allow: Any = "all") -> GpuInventory:
    return mark_allocatable(backend.snapshot(), allow)


def test_two_jobs_get_disjoint_gpus_a_third_waits_and_a_lost_gpu_is_never_leased() -> None:
    fake = two_gpu_fake()
    backend = NvmlBackend(fake)
    leases = GpuLeases()
    inv = inventory(backend)

    first = leases.try_lease("j-1", 1, None, inv)
    second = leases.try_lease("j-2", 1, None, inv)
    assert first == (UUID0,)
    assert second == (UUID1,)
    assert leases.try_lease("j-3", 1, None, inv) is None
    assert leases.held() == {"j-1": (UUID0,), "j-2": (UUID1,)}

    leases.release("j-1")
    assert leases.try_lease("j-3", 1, None, inv) == (UUID0,)

    # GPU 1 falls off the bus while j-2 holds it; j-2 keeps its lease until released,
    # and once released, nobody gets GPU 1 again.
    fake.gpus[1].lose()
    inv = inventory(backend)
    assert inv.gpus[1].health == "lost"
    assert leases.held()["j-2"] == (UUID1,)
    leases.release("j-2")
    leases.release("j-3")
    assert leases.try_lease("j-4", 2, None, inv) is None
    assert leases.try_lease("j-4", 1, None, inv) == (UUID0,)
    assert leases.try_lease("j-5", 1, None, inv) is None
    assert leases.free(inv) == []


def test_a_gpu_lost_before_the_agent_first_saw_it_is_never_leased() -> None:
    fake = two_gpu_fake()
    fake.gpus[0].lose()
    inv = inventory(NvmlBackend(fake))
    leases = GpuLeases()
    assert leases.try_lease("j-1", 1, None, inv) == (UUID1,)
    assert leases.try_lease("j-2", 1, None, inv) is None


def test_a_degraded_gpu_is_never_leased() -> None:
    fake = two_gpu_fake()
    fake.gpus[0].ecc_volatile_uncorrected = 3
    inv = inventory(NvmlBackend(fake))
    assert inv.gpus[0].health == "degraded"
    leases = GpuLeases()
    assert leases.try_lease("j-1", 1, None, inv) == (UUID1,)
    assert leases.try_lease("j-2", 1, None, inv) is None


def test_all_or_nothing() -> None:
    inv = inventory(NvmlBackend(two_gpu_fake()))
    leases = GpuLeases()
    assert leases.try_lease("j-1", 1, None, inv) == (UUID0,)
    assert leases.try_lease("j-2", 2, None, inv) is None
    assert leases.held() == {"j-1": (UUID0,)}
    assert [gpu.uuid for gpu in leases.free(inv)] == [UUID1]
    leases.release("j-1")
    assert leases.try_lease("j-2", 2, None, inv) == (UUID0, UUID1)


def test_types_pick_the_matching_gpus() -> None:
    fake = FakeNvml(
        [FakeGpu(uuid=UUID0, name=A100), FakeGpu(uuid=UUID1, name=H100)],
    )
    inv = inventory(NvmlBackend(fake))
    leases = GpuLeases()
    assert leases.try_lease("h", 1, (H100,), inv) == (UUID1,)
    assert leases.try_lease("h2", 1, (H100,), inv) is None  # the A100 is free but no match
    assert leases.try_lease("any", 1, (), inv) == (UUID0,)
    leases.release("any")
    assert leases.try_lease("either", 1, (H100, A100), inv) == (UUID0,)


@pytest.mark.parametrize("allow", [(1,), ("1",), (UUID1,), (UUID1.upper(),)])
def test_gpus_excluded_by_allow_are_never_leased(allow: tuple[int | str, ...]) -> None:
    inv = inventory(NvmlBackend(two_gpu_fake()), allow)
    leases = GpuLeases()
    assert leases.try_lease("j-1", 1, None, inv) == (UUID1,)
    assert leases.try_lease("j-2", 1, None, inv) is None


def test_lease_is_idempotent_and_release_too() -> None:
    inv = inventory(NvmlBackend(two_gpu_fake()))
    leases = GpuLeases()
    assert leases.try_lease("j-1", 1, None, inv) == (UUID0,)
    # A repeat (e.g. the manager retrying) gets the same GPU, not a second one.
    assert leases.try_lease("j-1", 1, None, inv) == (UUID0,)
    assert leases.try_lease("j-1", 2, None, inv) == (UUID0,)
    assert [gpu.uuid for gpu in leases.free(inv)] == [UUID1]
    leases.release("j-1")
    leases.release("j-1")
    leases.release("never-seen")
    assert leases.held() == {}
    assert len(leases.free(inv)) == 2


def test_zero_gpus_lease_nothing_and_need_no_inventory() -> None:
    leases = GpuLeases()
    assert leases.try_lease("cpu-only", 0, None, None) == ()
    assert leases.held() == {}
    assert leases.try_lease("gpu", 1, None, None) is None
    assert leases.free(None) == []
    with pytest.raises(ValueError, match="negative"):
        leases.try_lease("bad", -1, None, None)


def test_lowest_index_first_whatever_the_release_order() -> None:
    fake = two_gpu_fake()
    fake.gpus.append(FakeGpu(uuid="GPU-00000000-0000-0000-0000-000000000003"))
    inv = inventory(NvmlBackend(fake))
    leases = GpuLeases()
    for job in ("a", "b", "c"):
        leases.try_lease(job, 1, None, inv)
    leases.release("c")
    leases.release("a")
    assert leases.try_lease("d", 1, None, inv) == (UUID0,)


def test_restore_after_restart_blocks_those_gpus() -> None:
    fake = two_gpu_fake()
    backend = NvmlBackend(fake)
    inv = inventory(backend)
    leases = GpuLeases()
    leases.restore("old", (UUID0,))
    assert leases.try_lease("new", 1, None, inv) == (UUID1,)
    assert leases.held() == {"old": (UUID0,), "new": (UUID1,)}
    with pytest.raises(ValueError, match="already leased to job new"):
        leases.restore("other", (UUID1,))
    leases.release("old")
    assert leases.try_lease("next", 1, None, inv) == (UUID0,)


def test_restore_keeps_a_gpu_the_inventory_no_longer_offers() -> None:
    leases = GpuLeases()
    leases.restore("old", (UUID1,))
    # After the restart, gpus.allow no longer lists GPU 1: the container still has it.
    inv = inventory(NvmlBackend(two_gpu_fake()), (0,))
    assert leases.held() == {"old": (UUID1,)}
    assert leases.try_lease("new", 1, None, inv) == (UUID0,)
    leases.restore("old", ())
    assert leases.held() == {"new": (UUID0,)}


def test_busy_gpus_make_a_job_wait_not_fail(tmp_path: Path) -> None:
    data = valid_config(tmp_path)
    data["runtime"] = {"allowed_images": ["registry.example/*"]}
    config = parse_config(data)
    inv = inventory(NvmlBackend(two_gpu_fake()))
    leases = GpuLeases()
    leases.try_lease("j-1", 2, None, inv)
    assign = JobAssign.model_validate(
        {
            "type": "job.assign",
            "job_id": "j-2",
            "image": {"ref": "registry.example/p/m:1"},
            "datastore": "vitals",
            "gpus": {"count": 1, "types": [H100]},
        }
    )
    job = admit(assign, config, node_cpus=8, gpus=inv, gpu_support=True)
    assert isinstance(job, Admitted)
    assert leases.try_lease(job.job_id, job.gpu_count, job.gpu_types, inv) is None
    leases.release("j-1")
    assert leases.try_lease(job.job_id, job.gpu_count, job.gpu_types, inv) == (UUID0,)
