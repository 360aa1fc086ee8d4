"""MIG instances of a GPU in MIG mode, read through NVML, as leasable units.

A GPU in MIG mode is split into instances, each with its own ``MIG-…`` UUID and its
own memory; CUDA (and so a container) sees only the instances, never the parent. This
is how nomad-device-nvidia models it, and what :class:`agent.jobs.gpus.GpuLeases`
leases: the parent is listed, not allocatable, followed by its instances.

NVML calls: ``nvmlDeviceGetMaxMigDeviceCount`` (how many slots to look at),
``nvmlDeviceGetMigDeviceHandleByIndex`` (``NOT_FOUND`` for an empty slot), then
``nvmlDeviceGetUUID``, ``nvmlDeviceGetName`` (e.g. ``"NVIDIA H100 80GB HBM3 MIG
1g.10gb"``) and memory info on the instance's handle. Utilisation, temperature and
power are per chip, not per instance (NVML answers ``NOT_SUPPORTED`` on a MIG handle),
so an instance reports them as ``None``; its health is its parent's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pynvml

from agent.gpu.base import GpuInfo
from agent.gpu.nvml_api import text as _text

MIB = 1024 * 1024


def mig_instances(
    nvml: Any,
    parent_handle: Any,
    parent: GpuInfo,
    get: Callable[..., Any],
    memory: Callable[[Any], tuple[int | None, int | None]],
) -> tuple[GpuInfo, ...]:
    """The MIG instances of ``parent`` (already read, in MIG mode), in slot order.

    ``get(call, *args)`` is the backend's per-field call (``None`` for a value NVML
    cannot give; it raises for a lost GPU); ``memory(handle)`` gives (total, used) MiB.
    An instance without a UUID is left out: it could not be handed to a container.
    """
    slots = get(nvml.nvmlDeviceGetMaxMigDeviceCount, parent_handle)
    out: list[GpuInfo] = []
    for slot in range(int(slots or 0)):
        try:
            handle = nvml.nvmlDeviceGetMigDeviceHandleByIndex(parent_handle, slot)
        except pynvml.NVMLError as err:
            if err.value in (pynvml.NVML_ERROR_NOT_FOUND, pynvml.NVML_ERROR_INVALID_ARGUMENT):
                continue  # an empty slot
            get(_raise, err)  # lost / stopped propagate as for any other call
            continue
        uuid = _text(get(nvml.nvmlDeviceGetUUID, handle))
        if uuid is None:
            continue
        total, used = memory(handle)
        out.append(
            dataclasses.replace(
                parent,
                uuid=uuid,
                name=_text(get(nvml.nvmlDeviceGetName, handle)),
                memory_total_mib=total,
                memory_used_mib=used,
                utilization_pct=None,
                temperature_c=None,
                power_w=None,
                allocatable=parent.health == "ok",
                parent_uuid=parent.uuid,
                mig_index=slot,
            )
        )
    return tuple(out)


def _raise(err: pynvml.NVMLError) -> None:
    raise err
