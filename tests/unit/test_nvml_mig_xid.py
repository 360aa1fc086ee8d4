"""NVML on real servers (issue 14): MIG instances as leasable units, XID events, GPUs
that answer UNKNOWN/TIMEOUT, v2 memory info and the current temperature call, all
over FakeNvml."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pynvml import NVML_ERROR_TIMEOUT, NVML_ERROR_UNKNOWN

from agent.gpu.base import mark_allocatable, unmatched_allow_entries
from agent.gpu.nvml import STRIKES, NvmlBackend
from agent.jobs.admission import leasable
from agent.jobs.gpus import GpuLeases
from tests.fakes.nvml import MIB, FakeGpu, FakeMig, FakeNvml, two_gpu_fake

WAIT_S = 10.0  # upper bound for the XID thread to catch up; tests never sleep
UUID0 = "GPU-5e3c8a52-1a4f-4b0e-9f7d-3c2b1a0e9d01"
UUID1 = "GPU-9b1d7e44-6c2a-4e8f-8a3b-5d4c3b2a1f02"
MIG_A = "MIG-1f0c9a7e-2b3d-5e6f-8a9b-0c1d2e3f4a5b"
MIG_B = "MIG-7a6b5c4d-3e2f-5a1b-9c8d-7e6f5a4b3c2d"


def mig_fake() -> FakeNvml:
    """GPU 0 in MIG mode with two instances (slots 0 and 3, 1 and 2 empty); GPU 1 whole."""
    fake = two_gpu_fake()
    fake.gpus[0].mig_enabled = True
    fake.gpus[0].mig_instances = {
        0: FakeMig(uuid=MIG_A, memory_used_bytes=2 * MIB),
        3: FakeMig(
            uuid=MIG_B, name="NVIDIA H100 80GB HBM3 MIG 3g.40gb", memory_total_bytes=40192 * MIB
        ),
    }
    return fake


def test_a_gpu_in_mig_mode_is_not_allocatable_and_its_instances_are() -> None:
    """Attack: a parent in MIG mode stayed `ok` and allocatable (a job leased a GPU that
    CUDA cannot use) and its MIG instances never appeared, so they could not be leased."""
    inv = mark_allocatable(NvmlBackend(mig_fake()).snapshot(), "all")

    parent, first, second, whole = inv.gpus
    assert (parent.uuid, parent.mig_mode, parent.allocatable) == (UUID0, True, False)
    assert (first.uuid, first.parent_uuid, first.index, first.mig_index) == (MIG_A, UUID0, 0, 0)
    assert (first.memory_total_mib, first.memory_used_mib) == (9984, 2)
    assert first.name == "NVIDIA H100 80GB HBM3 MIG 1g.10gb"
    assert (second.uuid, second.mig_index, second.memory_total_mib) == (MIG_B, 3, 40192)
    assert first.allocatable and second.allocatable and whole.allocatable
    assert (first.temperature_c, first.power_w) == (None, None)  # per chip, not per instance

    leases = GpuLeases()
    assert leases.try_lease("job-1", 3, None, inv) == (MIG_A, MIG_B, UUID1)
    assert leases.try_lease("job-2", 1, None, inv) is None  # the parent is never leased
    assert leasable(first, ("NVIDIA H100 80GB HBM3 MIG 1g.10gb",))
    assert not leasable(first, ("NVIDIA H100 80GB HBM3",))  # a slice is not a whole H100


def test_gpus_allow_matches_mig_uuids_and_a_parent_offers_its_instances() -> None:
    """Attack: a `MIG-…` UUID in gpus.allow never matched, so the instance the consumer
    offered was never used (and was reported as naming no GPU)."""
    raw = NvmlBackend(mig_fake()).snapshot()

    by_mig = mark_allocatable(raw, (MIG_B.upper(),))
    assert [g.uuid for g in by_mig.gpus if g.allocatable] == [MIG_B]
    assert unmatched_allow_entries(raw, (MIG_B,)) == ()

    by_index = mark_allocatable(raw, (0,))
    assert [g.uuid for g in by_index.gpus if g.allocatable] == [MIG_A, MIG_B]
    by_parent = mark_allocatable(raw, (UUID0,))
    assert [g.uuid for g in by_parent.gpus if g.allocatable] == [MIG_A, MIG_B]


def test_a_degraded_mig_parent_takes_its_instances_with_it() -> None:
    """Attack: an instance on a chip with uncorrectable ECC errors stayed leasable."""
    fake = mig_fake()
    fake.gpus[0].ecc_volatile_uncorrected = 1

    inv = mark_allocatable(NvmlBackend(fake).snapshot(), "all")

    assert [(g.health, g.allocatable) for g in inv.gpus[:3]] == [("degraded", False)] * 3


@pytest.fixture
def watched() -> Iterator[tuple[FakeNvml, NvmlBackend]]:
    fake = two_gpu_fake()
    backend = NvmlBackend(fake, watch_xids=True, xid_wait_ms=20)
    backend.snapshot()
    assert backend.xid_watcher is not None and backend.xid_watcher.wait_watching(WAIT_S)
    yield fake, backend
    backend.close()
    assert not fake.initialised  # the thread let go of NVML


def _post(fake: FakeNvml, backend: NvmlBackend, index: int, *xids: int) -> None:
    assert backend.xid_watcher is not None
    for xid in xids:
        assert fake.xid(index, xid) == 1
    assert backend.xid_watcher.wait_handled(len(xids), WAIT_S)


@pytest.mark.parametrize(
    ("xid", "health", "words"),
    [(74, "degraded", "XID 74 (NVLink error)"), (79, "lost", "XID 79 (GPU has fallen off")],
)
def test_critical_xids_make_the_gpu_degraded_or_lost(
    watched: tuple[FakeNvml, NvmlBackend], xid: int, health: str, words: str
) -> None:
    """Attack: XID events were not watched, so a GPU whose NVLink failed (XID 74) or
    whose GSP timed out kept taking jobs while every poll still looked fine."""
    fake, backend = watched
    _post(fake, backend, 1, xid)

    inv = mark_allocatable(backend.snapshot(), "all")

    gpu0, gpu1 = inv.gpus
    assert (gpu0.health, gpu0.allocatable) == ("ok", True)
    assert (gpu1.health, gpu1.allocatable) == (health, False)
    assert any(r.startswith(words) and "reset the GPU" in r for r in gpu1.health_reasons)
    # The watcher let go of NVML so that the operator can reset the GPU.
    assert backend.xid_watcher is not None and not backend.xid_watcher.running
    assert not fake.initialised


def test_xids_of_the_application_are_ignored(watched: tuple[FakeNvml, NvmlBackend]) -> None:
    """Attack (the opposite mistake): a job's own illegal memory access (XID 13, 31, 43,
    45, 68, 109) took a healthy GPU out of service for every later job."""
    fake, backend = watched
    _post(fake, backend, 0, 13, 31, 43, 45, 68, 109)

    inv = backend.snapshot()

    assert [(g.health, g.allocatable) for g in inv.gpus] == [("ok", True), ("ok", True)]
    assert backend.xid_watcher is not None and backend.xid_watcher.running


def test_a_failing_event_wait_vouches_for_no_gpu(watched: tuple[FakeNvml, NvmlBackend]) -> None:
    """Attack: the XID thread died quietly and the GPUs stayed `ok` with nobody watching."""
    fake, backend = watched
    fake.fail("nvmlEventSetWait_v2", NVML_ERROR_UNKNOWN)
    watcher = backend.xid_watcher
    assert watcher is not None
    watcher._thread.join(WAIT_S)  # type: ignore[union-attr]  # it ends on the failure

    inv = backend.snapshot()

    assert [g.health for g in inv.gpus] == ["degraded", "degraded"]
    assert "XID errors can no longer be seen" in inv.gpus[0].health_reasons[0]


@pytest.mark.parametrize("code", [NVML_ERROR_UNKNOWN, NVML_ERROR_TIMEOUT])
def test_a_gpu_answering_unknown_or_timeout_is_degraded_after_a_few_samples(code: int) -> None:
    """Attack: a GPU that answered UNKNOWN or TIMEOUT to every health call stayed `ok`
    and allocatable, since each failed call only blanked one field."""
    fake = two_gpu_fake()
    fake.gpus[0].fail("nvmlDeviceGetTotalEccErrors", code)
    fake.gpus[0].fail("nvmlDeviceGetRemappedRows", code)
    backend = NvmlBackend(fake)

    early = [backend.snapshot().gpus[0].health for _ in range(STRIKES - 1)]
    late = mark_allocatable(backend.snapshot(), "all").gpus[0]

    assert early == ["ok"] * (STRIKES - 1)  # a hiccup is not a verdict
    assert (late.health, late.allocatable) == ("degraded", False)
    assert "no answer from this GPU in 3 samples in a row" in late.health_reasons[0]
    assert backend.snapshot().gpus[1].health == "ok"
    fake.gpus[0].heal()
    assert backend.snapshot().gpus[0].health == "ok"  # one good sample clears it


def test_used_memory_leaves_out_what_the_driver_reserves() -> None:
    """Attack: v1 memory info counts reserved memory as used, so an idle H200 showed
    hundreds of MiB in use where nvidia-smi shows 1 MiB."""
    gpu = FakeGpu(
        uuid=UUID0,
        name="NVIDIA H200",
        memory_total_bytes=143771 * MIB,
        memory_used_bytes=1 * MIB,
        memory_reserved_bytes=548 * MIB,
    )

    inv = NvmlBackend(FakeNvml([gpu])).snapshot()

    assert (inv.gpus[0].memory_used_mib, inv.gpus[0].memory_total_mib) == (1, 143771)


def test_an_old_driver_falls_back_to_the_v1_calls() -> None:
    """Attack: a driver before 510 lacks the v2 calls; memory and temperature must not
    go blank there."""
    fake = FakeNvml([FakeGpu(uuid=UUID0, memory_reserved_bytes=0)], old_driver=True)

    gpu = NvmlBackend(fake).snapshot().gpus[0]

    assert (gpu.memory_used_mib, gpu.temperature_c, gpu.health) == (4, 31, "ok")


def test_temperature_uses_the_current_call() -> None:
    """Attack: nvmlDeviceGetTemperature is deprecated and goes away with CUDA 14."""
    fake = two_gpu_fake()
    fake.gpus[0].temperature_c = 58

    assert NvmlBackend(fake).snapshot().gpus[0].temperature_c == 58
    assert "nvmlDeviceGetTemperatureV" in fake.calls
    assert "nvmlDeviceGetTemperature" not in fake.calls
