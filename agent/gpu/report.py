"""What ``cloudbender-agent gpus`` prints: a table for people, JSON for programs.

Both are pure functions of a :class:`~agent.gpu.base.GpuInventory`; the command takes
the snapshot and applies ``gpus.allow`` before calling them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from agent.gpu.base import GpuInfo, GpuInventory

DASH = "—"  # a value NVML cannot give; never 0, which would be a claim

_HEADER = ("GPU", "NAME", "MEMORY USED / TOTAL", "UTIL", "TEMP", "POWER", "HEALTH", "ALLOCATABLE")
# Numbers right-aligned so that their digits line up, words left-aligned.
_ALIGN = (">", "<", ">", ">", ">", ">", "<", "<")
_INDENT = " " * 5


def inventory_json(inv: GpuInventory) -> str:
    """``inv`` as the JSON object ``gpus --json`` prints: exactly
    :meth:`GpuInventory.to_dict`, no trailing newline."""
    return json.dumps(inv.to_dict(), indent=2)


def render_table(inv: GpuInventory) -> str:
    """A table to read at a glance, in the manner of ``nvidia-smi`` and ``gpustat``.

    One row per GPU (a MIG instance as ``<parent index>:<slot>``, after its parent),
    then its UUID and PCI bus id (what ``gpus.allow`` and other tools name it by) and,
    for an unhealthy GPU, each reason on its own line. A value NVML could not give
    shows as ``—``. With no GPUs, a single line ``No GPUs: <why>``. No trailing newline.
    """
    if not inv.gpus:
        return f"No GPUs: {_why_none(inv)}"
    allocatable = sum(gpu.allocatable for gpu in inv.gpus)
    lines = [
        f"NVIDIA driver {_or_dash(inv.driver_version)}, CUDA {_or_dash(inv.cuda_version)}:"
        f" {len(inv.gpus)} GPU(s), {allocatable} allocatable",
        "",
    ]
    rows = [_HEADER, *(_row(gpu) for gpu in inv.gpus)]
    widths = [max(len(row[col]) for row in rows) for col in range(len(_HEADER))]
    lines.append(_format(_HEADER, widths))
    for gpu, row in zip(inv.gpus, rows[1:], strict=True):
        lines.append(_format(row, widths))
        lines.append(f"{_INDENT}{_or_dash(gpu.uuid)}  {_or_dash(gpu.pci_bus_id)}")
        lines.extend(f"{_INDENT}! {reason}" for reason in gpu.health_reasons)
    return "\n".join(lines)


def _why_none(inv: GpuInventory) -> str:
    if inv.reason:
        return inv.reason
    if inv.available:
        return f"NVML found no NVIDIA GPU on this machine (driver {_or_dash(inv.driver_version)})"
    return "NVML could not be used"  # a backend broke the contract; still say something


def _row(gpu: GpuInfo) -> tuple[str, ...]:
    return (
        str(gpu.index) if gpu.mig_index is None else f"{gpu.index}:{gpu.mig_index}",
        _or_dash(gpu.name),
        _memory(gpu.memory_used_mib, gpu.memory_total_mib),
        _or_dash(gpu.utilization_pct, "{}%"),
        _or_dash(gpu.temperature_c, "{}°C"),
        _or_dash(gpu.power_w, "{:.1f} W"),
        gpu.health,
        _allocatable(gpu),
    )


def _memory(used: int | None, total: int | None) -> str:
    if used is None and total is None:
        return DASH
    return f"{_or_dash(used)} / {_or_dash(total)} MiB"


def _allocatable(gpu: GpuInfo) -> str:
    if gpu.allocatable:
        return "yes"
    # Say why, since the fix differs: the config (gpus.allow) or the hardware.
    if gpu.health != "ok":
        return "no (health)"
    return "no (MIG mode)" if gpu.is_mig_parent else "no (gpus.allow)"


def _or_dash(value: object, fmt: str = "{}") -> str:
    return DASH if value is None else fmt.format(value)


def _format(cells: Sequence[str], widths: Sequence[int]) -> str:
    parts = (
        f"{cell:{align}{width}}" for cell, align, width in zip(cells, _ALIGN, widths, strict=True)
    )
    return "  ".join(parts).rstrip()
