"""The GPU inventory's value types, the backend interface, and pure helpers.

Nothing here talks to NVML. A backend (``agent.gpu.nvml.NvmlBackend`` in production, the
same class over ``tests.fakes.nvml.FakeNvml`` in tests) produces a :class:`GpuInventory`;
:func:`mark_allocatable` then applies the consumer's ``gpus.allow`` setting to it.

Contracts shared by every backend:

- A value the hardware or driver cannot give is ``None``, never a made-up number
  (docs/protocol.md §3: "a metric the hardware cannot report is null").
- A broken GPU is data, not an exception: it appears with ``health`` ``"lost"`` or
  ``"degraded"`` and ``health_reasons`` in words a person can act on.
- A node without a usable NVIDIA driver has an inventory with no GPUs,
  ``available=False`` and a ``reason``; it is not an error.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Protocol, TypeAlias

Health = Literal["ok", "degraded", "lost"]
HEALTH_STATES: tuple[Health, ...] = ("ok", "degraded", "lost")
# The agent holds NVML only during a sample (agent.gpu.nvml), so this works while it runs.
RESET_HINT = "reset the GPU once its jobs have ended (nvidia-smi -r -i <index>)"

# What ``gpus.allow`` holds once parsed (agent.config.GpusConfig.allow).
Allow: TypeAlias = Literal["all"] | tuple[int | str, ...]


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as NVML saw it at one moment.

    ``index`` is NVML's index (the order ``nvidia-smi`` prints). Identity fields
    (``uuid``, ``name``, ``pci_bus_id``, ``memory_total_mib``) may be ``None`` only when
    NVML would not give them; every other field is ``None`` when this GPU or driver
    does not support it or the GPU is lost. ``health_reasons`` is empty exactly when
    ``health`` is ``"ok"``.

    A MIG instance is an entry of its own: ``uuid`` is its ``MIG-…`` UUID, ``index`` its
    parent's NVML index, ``mig_index`` its slot on the parent, ``parent_uuid`` the
    parent's UUID, and its health is the parent's (one chip). Its parent (``mig_mode``
    true, ``mig_index`` ``None``) is never allocatable: CUDA cannot use a GPU in MIG
    mode except through its instances.
    """

    index: int
    uuid: str | None
    name: str | None
    memory_total_mib: int | None
    memory_used_mib: int | None
    pci_bus_id: str | None
    driver_version: str | None
    cuda_version: str | None
    utilization_pct: int | None
    temperature_c: int | None
    power_w: float | None
    ecc_volatile_uncorrected: int | None
    mig_mode: bool | None
    health: Health
    health_reasons: tuple[str, ...]
    allocatable: bool = True
    parent_uuid: str | None = None
    mig_index: int | None = None

    @property
    def is_mig_parent(self) -> bool:
        """A physical GPU in MIG mode: only its instances can be leased."""
        return self.mig_mode is True and self.mig_index is None

    def to_dict(self) -> dict[str, object]:
        """Every field, JSON-ready (``health_reasons`` becomes a list)."""
        return {
            "index": self.index,
            "uuid": self.uuid,
            "name": self.name,
            "memory_total_mib": self.memory_total_mib,
            "memory_used_mib": self.memory_used_mib,
            "pci_bus_id": self.pci_bus_id,
            "driver_version": self.driver_version,
            "cuda_version": self.cuda_version,
            "utilization_pct": self.utilization_pct,
            "temperature_c": self.temperature_c,
            "power_w": self.power_w,
            "ecc_volatile_uncorrected": self.ecc_volatile_uncorrected,
            "mig_mode": self.mig_mode,
            "health": self.health,
            "health_reasons": list(self.health_reasons),
            "allocatable": self.allocatable,
            "parent_uuid": self.parent_uuid,
            "mig_index": self.mig_index,
        }


@dataclass(frozen=True)
class GpuInventory:
    """All GPUs of this node, or why there are none.

    ``available`` is ``False`` when NVML could not be used at all (no driver, driver not
    loaded, no permission); ``gpus`` is then empty and ``reason`` says why in words.
    ``reason`` is ``None`` whenever ``available`` is ``True``, including on a node where
    NVML works and simply finds no GPU.
    """

    gpus: tuple[GpuInfo, ...]
    available: bool
    reason: str | None
    driver_version: str | None
    cuda_version: str | None

    @classmethod
    def unavailable(cls, reason: str) -> GpuInventory:
        """The inventory of a node where NVML cannot be used, for ``reason``."""
        return cls(gpus=(), available=False, reason=reason, driver_version=None, cuda_version=None)

    def to_dict(self) -> dict[str, object]:
        """JSON-ready; the shape ``cloudbender-agent gpus --json`` prints."""
        return {
            "gpus": [gpu.to_dict() for gpu in self.gpus],
            "available": self.available,
            "reason": self.reason,
            "driver_version": self.driver_version,
            "cuda_version": self.cuda_version,
        }


@dataclass(frozen=True)
class HealthSignals:
    """What one poll of a reachable GPU says about its health (``None``: unknown)."""

    ecc_volatile_uncorrected: int | None = None
    retired_pages_pending: bool | None = None
    row_remap_pending: bool | None = None
    row_remap_failed: bool | None = None
    inforom_corrupted: bool | None = None


def judge_health(signals: HealthSignals) -> tuple[Health, tuple[str, ...]]:
    """The verdict on a GPU that answers: ``"ok"`` or ``"degraded"``, with reasons.

    Unknown signals (``None``) count as fine: a GPU that does not support a check is
    not thereby unhealthy. Which signals count, and why: ``agent.gpu.nvml``'s docstring
    and docs/gpus.md. (``"lost"`` is decided by the backend, which cannot poll then.)
    """
    reasons: list[str] = []
    if signals.ecc_volatile_uncorrected:
        reasons.append(
            f"{signals.ecc_volatile_uncorrected} uncorrectable ECC memory error(s)"
            " since the driver was loaded"
        )
    if signals.retired_pages_pending:
        reasons.append(f"a memory page is waiting to be retired: {RESET_HINT} to retire it")
    if signals.row_remap_pending:
        reasons.append(f"a memory row remapping is pending: {RESET_HINT} to apply it")
    if signals.row_remap_failed:
        reasons.append("a memory row remapping failed: the GPU memory can no longer be repaired")
    if signals.inforom_corrupted:
        reasons.append("the GPU's InfoROM is corrupted")
    return ("degraded" if reasons else "ok"), tuple(reasons)


class GpuBackend(Protocol):
    """Where inventories come from.

    ``snapshot`` blocks (NVML calls take milliseconds, a sick GPU can take seconds), so
    the daemon runs it in a worker thread; implementations must be thread-safe.
    """

    def snapshot(self) -> GpuInventory:
        """The inventory now. Never raises for driver or device errors: a missing
        driver gives an unavailable inventory, a broken GPU a ``lost`` or ``degraded``
        entry with reasons."""
        ...

    def close(self) -> None:
        """Release the driver. Idempotent; a later ``snapshot`` may start it again."""
        ...


def selects(entry: int | str, gpu: GpuInfo) -> bool:
    """Whether one ``gpus.allow`` entry names ``gpu``.

    An int, or a string of digits (YAML ``"0"``), is an NVML index; any other string is
    a UUID (``GPU-…``, or ``MIG-…``), compared without regard to case because people
    copy them from tools that print either. An index or a ``GPU-…`` UUID names the
    whole physical GPU, so it selects that GPU's MIG instances too; a ``MIG-…`` UUID
    names one instance only.
    """
    if isinstance(entry, bool):  # bool is an int to Python, never an index to a person
        return False
    if isinstance(entry, int):
        return entry == gpu.index
    text = entry.strip()
    if text.isdigit():
        return int(text) == gpu.index
    return any(u is not None and text.lower() == u.lower() for u in (gpu.uuid, gpu.parent_uuid))


def mark_allocatable(inv: GpuInventory, allow: Allow) -> GpuInventory:
    """``inv`` with each GPU's ``allocatable`` set from ``allow`` and its health.

    A GPU is allocatable when the config offers it (``"all"``, or its index or UUID is
    listed) and its health is ``"ok"``: a degraded or lost GPU is never handed to a job,
    whatever the config says. A GPU in MIG mode is never allocatable itself (its
    instances are). The verdict is recomputed from scratch, so applying a new
    ``allow`` after a config reload can re-admit a GPU an older one excluded. Pure and
    idempotent.
    """
    marked = tuple(
        dataclasses.replace(
            gpu,
            allocatable=gpu.health == "ok"
            and not gpu.is_mig_parent
            and (allow == "all" or any(selects(entry, gpu) for entry in allow)),
        )
        for gpu in inv.gpus
    )
    return dataclasses.replace(inv, gpus=marked)


def unmatched_allow_entries(inv: GpuInventory, allow: Allow) -> tuple[int | str, ...]:
    """The ``gpus.allow`` entries that name no GPU in ``inv``, in config order.

    For warnings such as "gpus.allow lists GPU-… which this node does not have": a typo
    there silently offers fewer GPUs than the consumer meant to.
    """
    if allow == "all":
        return ()
    return tuple(entry for entry in allow if not any(selects(entry, g) for g in inv.gpus))
