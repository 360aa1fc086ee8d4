"""The NVML backend over FakeNvml: what the inventory says when GPUs work, lack
features, break, or are missing altogether; and how gpus.allow picks GPUs."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from pynvml import (
    NVML_ERROR_DRIVER_NOT_LOADED,
    NVML_ERROR_GPU_IS_LOST,
    NVML_ERROR_LIB_RM_VERSION_MISMATCH,
    NVML_ERROR_NO_PERMISSION,
    NVML_ERROR_NOT_SUPPORTED,
    NVML_ERROR_RESET_REQUIRED,
    NVML_ERROR_UNINITIALIZED,
    NVML_ERROR_UNKNOWN,
)

from agent.gpu.base import GpuInventory, mark_allocatable, unmatched_allow_entries
from agent.gpu.nvml import INIT_RETRY_S, NvmlBackend
from tests.fakes.nvml import MIB, FakeGpu, FakeNvml, two_gpu_fake

UUID0 = "GPU-5e3c8a52-1a4f-4b0e-9f7d-3c2b1a0e9d01"
UUID1 = "GPU-9b1d7e44-6c2a-4e8f-8a3b-5d4c3b2a1f02"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_healthy_gpus_report_every_field_in_the_units_people_use() -> None:
    fake = two_gpu_fake()
    fake.gpus[0].memory_used_bytes = 70211 * MIB + 123  # NVML counts bytes
    fake.gpus[0].power_mw = 612_500
    fake.gpus[0].utilization_pct = 97
    fake.gpus[0].temperature_c = 64

    inv = NvmlBackend(fake).snapshot()

    assert inv.available
    assert inv.reason is None
    assert (inv.driver_version, inv.cuda_version) == ("550.54.15", "12.4")
    first, second = inv.gpus
    assert (first.index, first.uuid, first.name) == (0, UUID0, "NVIDIA H100 80GB HBM3")
    assert (first.memory_used_mib, first.memory_total_mib) == (70211, 81559)
    assert (first.power_w, first.utilization_pct, first.temperature_c) == (612.5, 97, 64)
    assert first.pci_bus_id == "00000000:18:00.0"
    assert (first.driver_version, first.cuda_version) == ("550.54.15", "12.4")
    assert (first.ecc_volatile_uncorrected, first.mig_mode) == (0, False)
    assert (first.health, first.health_reasons, first.allocatable) == ("ok", (), True)
    assert second.uuid == UUID1
    assert second.health == "ok"
    json.dumps(inv.to_dict())  # JSON-ready as it is


def test_power_not_supported_then_gpu_lost_affects_only_that_gpu() -> None:
    fake = two_gpu_fake()
    backend = NvmlBackend(fake)
    fake.gpus[1].fail("nvmlDeviceGetPowerUsage", NVML_ERROR_NOT_SUPPORTED)

    inv = mark_allocatable(backend.snapshot(), "all")
    gpu1 = inv.gpus[1]
    assert gpu1.power_w is None  # not reported, and not guessed
    assert (gpu1.health, gpu1.allocatable) == ("ok", True)
    assert gpu1.temperature_c == 33
    assert gpu1.memory_total_mib == 81559

    fake.gpus[1].lose()
    inv = mark_allocatable(backend.snapshot(), "all")

    lost, other = inv.gpus[1], inv.gpus[0]
    assert (lost.health, lost.allocatable) == ("lost", False)
    assert lost.health_reasons == ("GPU is lost (fallen off the bus)",)
    # Still says which GPU it was, but no stale readings.
    assert (lost.uuid, lost.pci_bus_id) == (UUID1, "00000000:2A:00.0")
    assert lost.temperature_c is None
    assert lost.memory_used_mib is None
    assert (other.health, other.allocatable, other.power_w) == ("ok", True, 71.0)
    assert inv.available


def test_gpu_lost_in_the_middle_of_a_read_is_lost() -> None:
    fake = two_gpu_fake()
    fake.gpus[0].fail("nvmlDeviceGetTemperatureV", NVML_ERROR_GPU_IS_LOST)

    gpu = NvmlBackend(fake).snapshot().gpus[0]

    assert (gpu.health, gpu.uuid, gpu.power_w) == ("lost", UUID0, None)


def test_gpu_that_needs_a_reset_is_lost() -> None:
    fake = two_gpu_fake()
    fake.gpus[0].fail("nvmlDeviceGetUtilizationRates", NVML_ERROR_RESET_REQUIRED)

    gpu = NvmlBackend(fake).snapshot().gpus[0]

    assert gpu.health == "lost"
    assert "reset" in gpu.health_reasons[0]


def test_gpu_that_cannot_be_opened_is_lost_with_the_nvml_error() -> None:
    fake = two_gpu_fake()
    fake.gpus[0].fail("nvmlDeviceGetHandleByIndex", NVML_ERROR_UNKNOWN)

    inv = NvmlBackend(fake).snapshot()

    assert inv.gpus[0].health == "lost"
    assert inv.gpus[0].health_reasons == ("NVML cannot open this GPU: Unknown Error",)
    assert inv.gpus[0].uuid is None  # never seen in this session, so not known
    assert inv.gpus[1].health == "ok"


def test_driver_missing_gives_no_gpus_and_a_reason_without_raising() -> None:
    fake = FakeNvml(driver_missing=True)
    backend = NvmlBackend(fake)

    inv = backend.snapshot()
    backend.close()

    assert inv == GpuInventory.unavailable(
        "NVIDIA driver not found: libnvidia-ml.so.1 could not be loaded"
    )
    assert "nvmlShutdown" not in fake.calls  # nothing was started, nothing to stop


def test_real_pynvml_never_raises_here_with_or_without_a_driver() -> None:
    backend = NvmlBackend()
    try:
        inv = backend.snapshot()
    finally:
        backend.close()
    if not inv.available:  # a machine without NVIDIA driver, such as CI
        assert inv.gpus == ()
        assert inv.reason


@pytest.mark.parametrize(
    ("code", "words"),
    [
        (NVML_ERROR_DRIVER_NOT_LOADED, "driver not loaded"),
        (NVML_ERROR_NO_PERMISSION, "no permission"),
        (NVML_ERROR_LIB_RM_VERSION_MISMATCH, "version mismatch"),
        (NVML_ERROR_UNKNOWN, "NVML could not start: Unknown Error"),
    ],
)
def test_init_failure_says_why(code: int, words: str) -> None:
    fake = two_gpu_fake()
    fake.fail("nvmlInit", code)

    inv = NvmlBackend(fake).snapshot()

    assert (inv.gpus, inv.available) == ((), False)
    assert inv.reason is not None
    assert words in inv.reason


def test_init_is_retried_but_not_on_every_snapshot() -> None:
    fake, clock = two_gpu_fake(driver_missing=True), Clock()
    backend = NvmlBackend(fake, clock=clock)

    for _ in range(5):
        assert not backend.snapshot().available
    assert fake.init_calls == 1

    fake.driver_missing = False  # the driver gets installed
    clock.now += INIT_RETRY_S - 1
    assert not backend.snapshot().available
    clock.now += 1
    inv = backend.snapshot()

    assert inv.available
    assert len(inv.gpus) == 2
    assert fake.init_calls == 2


@pytest.mark.parametrize(
    ("breakage", "words"),
    [
        (lambda g: setattr(g, "ecc_volatile_uncorrected", 2), "2 uncorrectable ECC"),
        (lambda g: setattr(g, "row_remap_pending", True), "row remapping is pending"),
        (lambda g: setattr(g, "row_remap_failed", True), "row remapping failed"),
        (lambda g: setattr(g, "retired_pages_pending", True), "waiting to be retired"),
        (lambda g: setattr(g, "inforom_valid", False), "InfoROM is corrupted"),
    ],
)
def test_memory_and_inforom_faults_make_a_gpu_degraded(breakage: object, words: str) -> None:
    fake = two_gpu_fake()
    breakage(fake.gpus[0])  # type: ignore[operator]

    inv = mark_allocatable(NvmlBackend(fake).snapshot(), "all")

    assert (inv.gpus[0].health, inv.gpus[0].allocatable) == ("degraded", False)
    assert any(words in reason for reason in inv.gpus[0].health_reasons)
    assert (inv.gpus[1].health, inv.gpus[1].allocatable) == ("ok", True)


def test_ecc_errors_are_counted_and_a_reset_brings_the_gpu_back() -> None:
    fake = two_gpu_fake()
    backend = NvmlBackend(fake)
    fake.gpus[0].ecc_volatile_uncorrected = 3

    assert backend.snapshot().gpus[0].ecc_volatile_uncorrected == 3
    fake.gpus[0].reset()
    gpu = backend.snapshot().gpus[0]

    assert (gpu.health, gpu.ecc_volatile_uncorrected, gpu.allocatable) == ("ok", 0, True)


def test_a_gpu_without_optional_features_reports_none_and_stays_ok() -> None:
    consumer = FakeGpu(
        uuid="GPU-00000000-0000-0000-0000-000000000003",
        name="NVIDIA GeForce RTX 4090",
        utilization_pct=None,
        temperature_c=None,
        power_mw=None,
        ecc_volatile_uncorrected=None,
        row_remap_pending=None,
        mig_enabled=None,
        inforom_valid=None,
    )
    fake = FakeNvml([consumer])
    fake.gpus[0].fail("nvmlDeviceGetName", NVML_ERROR_NO_PERMISSION)  # not fatal either

    gpu = NvmlBackend(fake).snapshot().gpus[0]

    assert gpu.name is None
    assert gpu.utilization_pct is gpu.temperature_c is gpu.power_w is None
    assert gpu.ecc_volatile_uncorrected is None
    assert gpu.mig_mode is None
    assert (gpu.health, gpu.allocatable, gpu.memory_total_mib) == ("ok", True, 81559)


def test_mig_mode_and_cuda_version_are_reported() -> None:
    fake = FakeNvml([FakeGpu(uuid=UUID0, mig_enabled=True)], cuda_version=11080)

    inv = NvmlBackend(fake).snapshot()

    assert inv.gpus[0].mig_mode is True
    assert inv.cuda_version == inv.gpus[0].cuda_version == "11.8"


def test_old_pynvml_bytes_are_decoded() -> None:
    inv = NvmlBackend(two_gpu_fake(legacy_bytes=True)).snapshot()

    assert (inv.driver_version, inv.gpus[0].uuid) == ("550.54.15", UUID0)
    assert inv.gpus[0].name == "NVIDIA H100 80GB HBM3"


def test_count_failure_is_an_unavailable_inventory() -> None:
    fake = two_gpu_fake()
    fake.fail("nvmlDeviceGetCount", NVML_ERROR_UNKNOWN, times=1)
    backend = NvmlBackend(fake)

    inv = backend.snapshot()

    assert (inv.available, inv.reason) == (False, "NVML could not count the GPUs: Unknown Error")
    assert len(backend.snapshot().gpus) == 2  # next poll reads again


def test_nvml_is_released_after_every_snapshot_so_a_gpu_reset_can_happen() -> None:
    """Attack: the agent held NVML open for good, so `nvidia-smi -r` (which the agent's
    own health message asks for) failed with "in use" while the agent ran."""
    fake = two_gpu_fake()
    backend = NvmlBackend(fake)

    backend.snapshot()
    assert not fake.initialised
    backend.snapshot()
    assert not fake.initialised
    backend.close()
    backend.close()

    assert fake.calls.count("nvmlInit") == fake.calls.count("nvmlShutdown") == 2
    assert [g.health for g in backend.snapshot().gpus] == ["ok", "ok"]


def test_nvml_shut_down_behind_the_backends_back_is_started_again() -> None:
    fake = two_gpu_fake()
    backend = NvmlBackend(fake)
    backend.snapshot()
    # Some other user in the process shut NVML down mid-read.
    fake.fail("nvmlDeviceGetCount", NVML_ERROR_UNINITIALIZED, times=1)

    inv = backend.snapshot()

    assert inv.available
    assert [g.health for g in inv.gpus] == ["ok", "ok"]


def test_snapshots_from_many_threads_are_serialised() -> None:
    backend = NvmlBackend(two_gpu_fake())
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda _: backend.snapshot(), range(64)))
    assert all(len(inv.gpus) == 2 and inv.gpus[1].uuid == UUID1 for inv in results)


# -- gpus.allow ----------------------------------------------------------------------


@pytest.fixture
def inventory() -> GpuInventory:
    return NvmlBackend(two_gpu_fake()).snapshot()


def _allocatable(inv: GpuInventory) -> list[int]:
    return [gpu.index for gpu in inv.gpus if gpu.allocatable]


@pytest.mark.parametrize(
    ("allow", "expected"),
    [
        ("all", [0, 1]),
        ((1,), [1]),
        (("0",), [0]),  # YAML "0" written as a string
        ((UUID1,), [1]),
        ((UUID0.upper(),), [0]),  # copied from a tool that prints upper case
        ((0, UUID1), [0, 1]),
        ((), []),
        ((True,), []),  # a YAML boolean is not GPU 1
    ],
)
def test_allow_selects_gpus_by_index_or_uuid(
    inventory: GpuInventory, allow: object, expected: list[int]
) -> None:
    assert _allocatable(mark_allocatable(inventory, allow)) == expected  # type: ignore[arg-type]


def test_a_lost_gpu_is_never_allocatable_even_when_listed() -> None:
    fake = two_gpu_fake()
    fake.gpus[0].lose()
    inv = NvmlBackend(fake).snapshot()

    assert _allocatable(mark_allocatable(inv, (0, 1))) == [1]
    assert _allocatable(mark_allocatable(inv, "all")) == [1]


def test_a_new_allow_list_can_readmit_a_gpu(inventory: GpuInventory) -> None:
    narrowed = mark_allocatable(inventory, (0,))

    assert _allocatable(mark_allocatable(narrowed, "all")) == [0, 1]


def test_allow_entries_naming_no_gpu_are_reported(inventory: GpuInventory) -> None:
    typo = UUID1[:-1] + "3"

    assert unmatched_allow_entries(inventory, (0, typo, 7)) == (typo, 7)
    assert unmatched_allow_entries(inventory, "all") == ()
