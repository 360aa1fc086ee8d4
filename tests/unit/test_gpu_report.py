"""What ``cloudbender-agent gpus`` shows: the table a person reads, the JSON a program
reads."""

from __future__ import annotations

import json

from pynvml import NVML_ERROR_NOT_SUPPORTED

from agent.gpu.base import GpuInfo, GpuInventory, mark_allocatable
from agent.gpu.nvml import NvmlBackend
from agent.gpu.report import inventory_json, render_table
from tests.fakes.nvml import MIB, FakeGpu, FakeNvml, two_gpu_fake

UUID0 = "GPU-5e3c8a52-1a4f-4b0e-9f7d-3c2b1a0e9d01"
UUID1 = "GPU-9b1d7e44-6c2a-4e8f-8a3b-5d4c3b2a1f02"


def _busy_and_lost() -> GpuInventory:
    fake = two_gpu_fake()
    backend = NvmlBackend(fake)
    backend.snapshot()  # the backend learns which GPU is which
    busy = fake.gpus[0]
    busy.memory_used_bytes, busy.utilization_pct = 70211 * MIB, 97
    busy.temperature_c, busy.power_mw = 64, 612_500
    fake.gpus[1].lose()
    return mark_allocatable(backend.snapshot(), "all")


def _row(table: str, index: int) -> str:
    return next(line for line in table.splitlines() if line.lstrip().startswith(f"{index}  "))


def test_table_shows_readings_with_units_and_who_may_use_each_gpu() -> None:
    table = render_table(_busy_and_lost())

    assert table.splitlines()[0] == ("NVIDIA driver 550.54.15, CUDA 12.4: 2 GPU(s), 1 allocatable")
    busy = _row(table, 0).split()
    assert busy[:5] == ["0", "NVIDIA", "H100", "80GB", "HBM3"]
    assert busy[5:] == ["70211", "/", "81559", "MiB", "97%", "64°C", "612.5", "W", "ok", "yes"]
    assert UUID0 in table
    assert "00000000:18:00.0" in table


def test_table_shows_a_lost_gpu_with_dashes_and_its_reason() -> None:
    table = render_table(_busy_and_lost())

    lost = _row(table, 1)
    assert lost.split()[5:] == ["—", "/", "81559", "MiB", "—", "—", "—", "lost", "no", "(health)"]
    below = table.splitlines()[table.splitlines().index(lost) + 1 :]
    assert below[0].split() == [UUID1, "00000000:2A:00.0"]
    assert below[1].strip() == "! GPU is lost (fallen off the bus)"
    assert "None" not in table


def test_columns_line_up() -> None:
    lines = render_table(_busy_and_lost()).splitlines()
    header = next(line for line in lines if line.startswith("GPU"))
    column = header.index("HEALTH")

    assert _row("\n".join(lines), 0)[column:].startswith("ok ")
    assert _row("\n".join(lines), 1)[column:].startswith("lost ")


def test_table_says_which_gpus_gpus_allow_leaves_out() -> None:
    inv = mark_allocatable(NvmlBackend(two_gpu_fake()).snapshot(), (UUID1,))

    table = render_table(inv)

    assert _row(table, 0).endswith("ok      no (gpus.allow)")
    assert _row(table, 1).endswith("ok      yes")
    assert "2 GPU(s), 1 allocatable" in table


def test_unknown_values_are_dashes_never_zero_or_none() -> None:
    gpu = FakeGpu(uuid=UUID0, power_mw=None, temperature_c=None, utilization_pct=None)
    fake = FakeNvml([gpu])
    fake.gpus[0].fail("nvmlDeviceGetMemoryInfo", NVML_ERROR_NOT_SUPPORTED)

    table = render_table(NvmlBackend(fake).snapshot())

    row = _row(table, 0).split()
    assert row[5:] == ["—", "—", "—", "—", "ok", "yes"]
    assert "None" not in table


def test_no_gpus_because_the_driver_is_missing_is_one_line_with_the_reason() -> None:
    inv = NvmlBackend(FakeNvml(driver_missing=True)).snapshot()

    assert render_table(inv) == (
        "No GPUs: NVIDIA driver not found: libnvidia-ml.so.1 could not be loaded"
    )


def test_no_gpus_on_a_working_driver_says_so() -> None:
    inv = NvmlBackend(FakeNvml([])).snapshot()

    assert render_table(inv) == (
        "No GPUs: NVML found no NVIDIA GPU on this machine (driver 550.54.15)"
    )


def test_json_of_a_gpu_less_node_is_the_cli_contract() -> None:
    inv = NvmlBackend(FakeNvml(driver_missing=True)).snapshot()

    assert json.loads(inventory_json(inv)) == {
        "gpus": [],
        "available": False,
        "reason": "NVIDIA driver not found: libnvidia-ml.so.1 could not be loaded",
        "driver_version": None,
        "cuda_version": None,
    }


def test_json_carries_every_field_of_every_gpu() -> None:
    inv = _busy_and_lost()

    document = json.loads(inventory_json(inv))

    assert document == inv.to_dict()
    assert [g["health"] for g in document["gpus"]] == ["ok", "lost"]
    assert document["gpus"][1]["health_reasons"] == ["GPU is lost (fallen off the bus)"]
    assert document["gpus"][1]["power_w"] is None
    assert set(document["gpus"][0]) == {f.name for f in GpuInfo.__dataclass_fields__.values()}
