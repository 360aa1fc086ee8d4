"""The NVML backend against the real driver: skipped on a machine without one.

On a healthy GPU node every field is either a plausible value or ``None`` (never a
placeholder such as 0 W or an empty name), and every GPU is ``ok`` and allocatable.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pynvml
import pytest

from agent.gpu.base import GpuInventory
from agent.gpu.nvml import NvmlBackend
from agent.gpu.report import render_table

pytestmark = pytest.mark.gpu


def _driver_or_skip() -> None:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as err:
        pytest.skip(f"no usable NVIDIA driver here: {err}")
    pynvml.nvmlShutdown()


@pytest.fixture(scope="module")
def backend() -> Iterator[NvmlBackend]:
    _driver_or_skip()
    backend = NvmlBackend()
    try:
        yield backend
    finally:
        backend.close()


@pytest.fixture(scope="module")
def inventory(backend: NvmlBackend) -> GpuInventory:
    inv = backend.snapshot()
    if not inv.gpus:
        pytest.skip("the NVIDIA driver is loaded but reports no GPU")
    return inv


def test_inventory_is_available_with_versions(inventory: GpuInventory) -> None:
    assert inventory.available
    assert inventory.reason is None
    assert inventory.driver_version is not None
    assert re.fullmatch(r"\d+\.\d+(\.\d+)?", inventory.driver_version)
    assert inventory.cuda_version is not None
    assert re.fullmatch(r"\d+\.\d+", inventory.cuda_version)


def test_every_field_is_a_plausible_value_or_none(inventory: GpuInventory) -> None:
    for gpu in inventory.gpus:
        assert gpu.uuid is not None
        assert gpu.uuid.startswith(("GPU-", "MIG-"))
        assert gpu.name
        assert gpu.pci_bus_id is not None
        assert re.fullmatch(r"[0-9A-Fa-f]{8}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}\.\d", gpu.pci_bus_id)
        assert gpu.memory_total_mib is not None
        assert gpu.memory_total_mib > 1024
        if gpu.memory_used_mib is not None:
            assert 0 <= gpu.memory_used_mib <= gpu.memory_total_mib
        assert (gpu.driver_version, gpu.cuda_version) == (
            inventory.driver_version,
            inventory.cuda_version,
        )
        if gpu.utilization_pct is not None:
            assert 0 <= gpu.utilization_pct <= 100
        if gpu.temperature_c is not None:
            assert 0 < gpu.temperature_c < 110
        if gpu.power_w is not None:
            assert 0 < gpu.power_w < 2000
        if gpu.ecc_volatile_uncorrected is not None:
            assert gpu.ecc_volatile_uncorrected >= 0
        assert gpu.mig_mode in (True, False, None)


def test_every_gpu_is_healthy_and_allocatable(inventory: GpuInventory) -> None:
    for gpu in inventory.gpus:
        assert (gpu.health, gpu.health_reasons) == ("ok", ()), gpu
        assert gpu.allocatable


def test_snapshots_agree_on_identity_and_survive_close(
    backend: NvmlBackend, inventory: GpuInventory
) -> None:
    def identity(inv: GpuInventory) -> list[tuple[object, ...]]:
        return [(g.index, g.uuid, g.pci_bus_id, g.memory_total_mib) for g in inv.gpus]

    again = backend.snapshot()
    backend.close()
    restarted = backend.snapshot()

    assert identity(again) == identity(inventory) == identity(restarted)


def test_table_renders(inventory: GpuInventory) -> None:
    table = render_table(inventory)

    assert "None" not in table
    for gpu in inventory.gpus:
        assert str(gpu.uuid) in table
