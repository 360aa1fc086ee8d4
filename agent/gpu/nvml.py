"""The NVML backend: the GPU inventory read through ``nvidia-ml-py`` (``pynvml``).

This is the only module that imports ``pynvml``. NVML is started lazily, on the first
:meth:`NvmlBackend.snapshot`, and if it cannot start (no driver, driver not loaded, no
permission) the snapshot is an empty inventory with ``available=False`` and the reason;
a later snapshot tries again, at most once every ``retry_init_s``, because a driver is
often installed or loaded after the agent has started.

Every field is read by its own NVML call. A call that fails with ``NOT_SUPPORTED`` (or
any other per-field error: no permission, a function an older driver lacks) leaves its
field ``None``; nothing is estimated. Units are converted from NVML's: bytes → MiB
(rounded down, as ``nvidia-smi`` does), milliwatts → watts, CUDA ``12040`` → ``"12.4"``.

Health follows the conditions that DCGM's background health watches (the ones
``dcgmi health`` runs, and that GPU health monitors built on DCGM act on) treat as
faults of the GPU itself, restricted to what one NVML poll can see:

lost (NVML cannot use the GPU at all; DCGM cannot watch it either)
    - any call answers ``GPU_IS_LOST``: the GPU fell off the bus (XID 79);
    - any call answers ``RESET_REQUIRED``: the GPU refuses work until it is reset;
    - ``nvmlDeviceGetHandleByIndex`` fails for any reason: the GPU cannot be opened.

degraded (DCGM's memory and InfoROM watches)
    - volatile uncorrected ECC errors > 0 (``nvmlDeviceGetTotalEccErrors``): DCGM fails
      the memory watch on any volatile double-bit error, because results computed since
      may be corrupt;
    - a retired page pending (``nvmlDeviceGetRetiredPagesPendingStatus``, pre-Ampere):
      a DCGM memory warning, cleared by a GPU reset or driver reload;
    - a row remapping pending or failed (``nvmlDeviceGetRemappedRows``, Ampere and
      later): pending needs a reset to take effect; failed means the memory cannot be
      repaired any more, a DCGM memory failure;
    - a corrupted InfoROM (``nvmlDeviceValidateInforom``): DCGM's InfoROM warning.

degraded (no answer): a GPU whose calls answer ``UNKNOWN`` or ``TIMEOUT`` in
:data:`STRIKES` samples in a row; one such answer is a hiccup, a run of them a GPU or
driver that no longer responds (per-field errors otherwise only cost the field).

XID events come from :class:`agent.gpu.xid.XidWatcher` (critical XIDs make a GPU
``degraded``, XID 79 ``lost``). Deliberately not used: thermal and power throttling (a
GPU at its power cap under load works as designed; a verdict that flaps with load would
move GPUs in and out of allocation); PCIe replay and NVLink error *rates*, which need
samples on a fixed interval.

NVML release policy: each snapshot starts NVML, reads, and shuts it down again, so the
agent holds nothing between samples. The XID watcher needs NVML open all the time, so
it runs only while every GPU is ``ok``; once a GPU is degraded or lost (the moment an
operator may want ``nvidia-smi -r``) it is stopped and the driver is free between
samples. The price: while a GPU needs attention, new XIDs on the others are not seen
(polled faults still are). :meth:`NvmlBackend.close` stops everything on request.
Memory used comes from ``nvmlDeviceGetMemoryInfo`` v2 (``nvmlMemory_v2``), which leaves
out memory the driver reserves, as ``nvidia-smi`` does; v1 is the fallback for drivers
before 510. Temperature: ``nvmlDeviceGetTemperatureV``, falling back to the deprecated
``nvmlDeviceGetTemperature``. MIG instances: :mod:`agent.gpu.mig`.

"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pynvml

from agent.gpu.base import GpuInfo, GpuInventory, Health, HealthSignals, judge_health
from agent.gpu.mig import mig_instances
from agent.gpu.nvml_api import NvmlApi, cuda_version_text, init_failure_reason
from agent.gpu.nvml_api import text as _text
from agent.gpu.xid import XidWatcher, apply_xids

INIT_RETRY_S = 30.0
STRIKES = 3  # samples in a row with UNKNOWN/TIMEOUT answers before a GPU is degraded
_MIB = 1024 * 1024
_NO_ANSWER = {pynvml.NVML_ERROR_UNKNOWN: "UNKNOWN", pynvml.NVML_ERROR_TIMEOUT: "TIMEOUT"}

_LOST_REASONS = {
    pynvml.NVML_ERROR_GPU_IS_LOST: "GPU is lost (fallen off the bus)",
    pynvml.NVML_ERROR_RESET_REQUIRED: "GPU needs a reset before it can be used again",
}


class _Lost(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Stopped(Exception):
    """NVML answered UNINITIALIZED: its refcount reached zero under us."""


@dataclass(frozen=True)
class _Identity:
    uuid: str | None = None
    name: str | None = None
    pci_bus_id: str | None = None
    memory_total_mib: int | None = None


class NvmlBackend:
    """:class:`~agent.gpu.base.GpuBackend` over NVML. Thread-safe: one lock serialises
    snapshots and ``close``.

    ``nvml`` is the ``pynvml`` module (the default) or a stand-in with the same
    functions (:class:`NvmlApi`); errors are always ``pynvml.NVMLError``. ``clock``
    paces init retries. ``watch_xids`` runs the XID watcher (the daemon does; a one-off
    command has no use for it); ``xid_wait_ms`` is how long its waits block.
    """

    def __init__(
        self,
        nvml: NvmlApi | None = None,
        *,
        retry_init_s: float = INIT_RETRY_S,
        clock: Callable[[], float] = time.monotonic,
        watch_xids: bool = False,
        xid_wait_ms: int = 1000,
    ) -> None:
        self._nvml: NvmlApi = nvml if nvml is not None else pynvml
        self._retry_init_s = retry_init_s
        self._clock = clock
        self._lock = threading.Lock()
        self._started = False
        self._failure: GpuInventory | None = None
        self._failed_at = 0.0
        # Identity of each index as last read, so that a GPU that is lost later is still
        # reported as *which* GPU it was. Kept across the per-sample NVML sessions;
        # cleared when the GPU count changes, since indexes may then mean other GPUs.
        self._identity: dict[int, _Identity] = {}
        self._count: int | None = None
        self._strikes: dict[int, int] = {}  # index → samples in a row with no answer
        self._no_answer: set[str] = set()  # calls of the GPU being read that got none
        self.xid_watcher: XidWatcher | None = (
            XidWatcher(self._nvml, wait_ms=xid_wait_ms) if watch_xids else None
        )

    def snapshot(self) -> GpuInventory:
        """The inventory now; see the module docstring. Never raises ``NVMLError``.
        NVML is shut down again before it returns (the XID watcher may hold its own
        reference)."""
        with self._lock:
            inv = self._snapshot_locked()
            watcher = self.xid_watcher
            if watcher is None:
                return inv
            inv = apply_xids(inv, watcher.verdicts())
            if inv.available and inv.gpus and all(g.health == "ok" for g in inv.gpus):
                watcher.start()
            else:
                watcher.stop()  # let go of the driver so that a reset can happen
            return inv

    def _snapshot_locked(self) -> GpuInventory:
        # Second round only if NVML was shut down under us mid-read: start it again.
        for _ in range(2):
            failure = self._start()
            if failure is not None:
                return failure
            try:
                return self._read_inventory()
            except _Stopped:
                self._started = False
            finally:
                self._release()
        return GpuInventory.unavailable("NVML keeps shutting down while being read")

    def close(self) -> None:
        """Stop the XID watcher and shut NVML down if this backend holds it. Idempotent;
        a later ``snapshot`` starts both again."""
        if self.xid_watcher is not None:
            self.xid_watcher.stop()
        with self._lock:
            self._release()
            self._failure = None

    def _release(self) -> None:
        if self._started:
            self._started = False
            # Failing means already shut down (a driver that went away): nothing to release.
            with contextlib.suppress(pynvml.NVMLError):
                self._nvml.nvmlShutdown()

    def _start(self) -> GpuInventory | None:
        """Start NVML unless it runs; ``None`` on success, else the inventory to report."""
        if self._started:
            return None
        now = self._clock()
        if self._failure is not None and now - self._failed_at < self._retry_init_s:
            return self._failure  # the last answer stands: don't hammer a missing driver
        try:
            self._nvml.nvmlInit()
        except pynvml.NVMLError as err:
            self._failure = GpuInventory.unavailable(init_failure_reason(err))
            self._failed_at = now
            return self._failure
        self._started, self._failure = True, None
        return None

    def _read_inventory(self) -> GpuInventory:
        nvml = self._nvml
        driver = _text(self._system(nvml.nvmlSystemGetDriverVersion))
        cuda_raw = self._system(nvml.nvmlSystemGetCudaDriverVersion_v2)
        cuda = cuda_version_text(int(cuda_raw)) if cuda_raw is not None else None
        try:
            count = int(nvml.nvmlDeviceGetCount())
        except pynvml.NVMLError as err:
            if err.value == pynvml.NVML_ERROR_UNINITIALIZED:
                raise _Stopped from err
            return GpuInventory.unavailable(f"NVML could not count the GPUs: {err}")
        if count != self._count:
            self._identity.clear()
            self._strikes.clear()
            self._count = count
        gpus = tuple(gpu for i in range(count) for gpu in self._read_gpu(i, driver, cuda))
        return GpuInventory(
            gpus, available=True, reason=None, driver_version=driver, cuda_version=cuda
        )

    def _system(self, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except pynvml.NVMLError as err:
            if err.value == pynvml.NVML_ERROR_UNINITIALIZED:
                raise _Stopped from err
            return None

    def _get(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``call(*args)``, or ``None`` when NVML cannot give this value."""
        try:
            return call(*args, **kwargs)
        except pynvml.NVMLError as err:
            self._note(call, err)
            return None

    def _note(self, call: Callable[..., Any], err: pynvml.NVMLError) -> None:
        _raise_if_fatal(err)
        if err.value in _NO_ANSWER:
            self._no_answer.add(f"{getattr(call, '__name__', call)}: {_NO_ANSWER[err.value]}")

    def _memory(self, handle: Any) -> tuple[int | None, int | None]:
        """(total, used) MiB; used without driver-reserved memory where NVML can say."""
        try:
            info = self._nvml.nvmlDeviceGetMemoryInfo(handle, version=pynvml.nvmlMemory_v2)
        except pynvml.NVMLError as err:
            _raise_if_fatal(err)  # else a driver before 510 (no _v2): use v1
            info = self._get(self._nvml.nvmlDeviceGetMemoryInfo, handle)
        if info is None:
            return None, None
        return int(info.total) // _MIB, int(info.used) // _MIB

    def _temperature(self, handle: Any) -> Any:
        sensor = pynvml.NVML_TEMPERATURE_GPU
        getter = getattr(self._nvml, "nvmlDeviceGetTemperatureV", None)  # nvidia-ml-py 12.560+
        if getter is not None:
            try:
                return getter(handle, sensor)
            except pynvml.NVMLError as err:
                if err.value != pynvml.NVML_ERROR_FUNCTION_NOT_FOUND:  # a driver that lacks it
                    self._note(getter, err)
                    return None
        return self._get(self._nvml.nvmlDeviceGetTemperature, handle, sensor)

    def _read_gpu(self, index: int, driver: str | None, cuda: str | None) -> tuple[GpuInfo, ...]:
        nvml, get = self._nvml, self._get
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
        except pynvml.NVMLError as err:
            if err.value == pynvml.NVML_ERROR_UNINITIALIZED:
                raise _Stopped from err
            reason = _LOST_REASONS.get(err.value, f"NVML cannot open this GPU: {err}")
            return (self._lost_gpu(index, driver, cuda, reason),)
        self._no_answer = set()
        try:
            total, used = self._memory(handle)
            pci = get(nvml.nvmlDeviceGetPciInfo, handle)
            identity = _Identity(
                uuid=_text(get(nvml.nvmlDeviceGetUUID, handle)),
                name=_text(get(nvml.nvmlDeviceGetName, handle)),
                pci_bus_id=_text(pci.busId) if pci is not None else None,
                memory_total_mib=total,
            )
            self._identity[index] = identity
            utilization = get(nvml.nvmlDeviceGetUtilizationRates, handle)
            temperature = self._temperature(handle)
            power_mw = get(nvml.nvmlDeviceGetPowerUsage, handle)
            ecc = get(
                nvml.nvmlDeviceGetTotalEccErrors,
                handle,
                pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
                pynvml.NVML_VOLATILE_ECC,
            )
            mig = get(nvml.nvmlDeviceGetMigMode, handle)
            retired_pending = get(nvml.nvmlDeviceGetRetiredPagesPendingStatus, handle)
            remap = get(nvml.nvmlDeviceGetRemappedRows, handle)
            signals = HealthSignals(
                ecc_volatile_uncorrected=int(ecc) if ecc is not None else None,
                retired_pages_pending=(
                    int(retired_pending) == pynvml.NVML_FEATURE_ENABLED
                    if retired_pending is not None
                    else None
                ),
                # (corrected rows, uncorrected rows, pending, failure occurred)
                row_remap_pending=bool(remap[2]) if remap is not None else None,
                row_remap_failed=bool(remap[3]) if remap is not None else None,
                inforom_corrupted=self._inforom_corrupted(handle),
            )
            health, reasons = judge_health(signals)
            health, reasons = self._count_strikes(index, health, reasons)
            gpu = GpuInfo(
                index=index,
                uuid=identity.uuid,
                name=identity.name,
                memory_total_mib=total,
                memory_used_mib=used,
                pci_bus_id=identity.pci_bus_id,
                driver_version=driver,
                cuda_version=cuda,
                utilization_pct=int(utilization.gpu) if utilization is not None else None,
                temperature_c=int(temperature) if temperature is not None else None,
                power_w=int(power_mw) / 1000 if power_mw is not None else None,
                ecc_volatile_uncorrected=signals.ecc_volatile_uncorrected,
                mig_mode=int(mig[0]) == pynvml.NVML_DEVICE_MIG_ENABLE if mig is not None else None,
                health=health,
                health_reasons=reasons,
            )
            gpu = dataclasses.replace(gpu, allocatable=health == "ok" and not gpu.is_mig_parent)
            if not gpu.is_mig_parent:
                return (gpu,)
            return (gpu, *mig_instances(nvml, handle, gpu, get, self._memory))
        except _Lost as lost:
            return (self._lost_gpu(index, driver, cuda, lost.reason),)

    def _count_strikes(
        self, index: int, health: Health, reasons: tuple[str, ...]
    ) -> tuple[Health, tuple[str, ...]]:
        """Add the no-answer verdict once UNKNOWN/TIMEOUT answers last STRIKES samples."""
        strikes = self._strikes[index] = self._strikes.get(index, 0) + 1 if self._no_answer else 0
        if strikes < STRIKES:
            return health, reasons
        calls = ", ".join(sorted(self._no_answer))
        reason = (
            f"NVML got no answer from this GPU in {strikes} samples in a row ({calls}):"
            " the GPU or its driver is not responding"
        )
        return "degraded" if health == "ok" else health, (*reasons, reason)

    def _inforom_corrupted(self, handle: Any) -> bool | None:
        # The check answers by raising, so it cannot go through _get.
        try:
            self._nvml.nvmlDeviceValidateInforom(handle)
        except pynvml.NVMLError as err:
            if err.value == pynvml.NVML_ERROR_CORRUPTED_INFOROM:
                return True
            self._note(self._nvml.nvmlDeviceValidateInforom, err)
            return None
        return False

    def _lost_gpu(self, index: int, driver: str | None, cuda: str | None, reason: str) -> GpuInfo:
        known = self._identity.get(index, _Identity())
        return GpuInfo(
            index=index,
            uuid=known.uuid,
            name=known.name,
            memory_total_mib=known.memory_total_mib,
            memory_used_mib=None,
            pci_bus_id=known.pci_bus_id,
            driver_version=driver,
            cuda_version=cuda,
            utilization_pct=None,
            temperature_c=None,
            power_w=None,
            ecc_volatile_uncorrected=None,
            mig_mode=None,
            health="lost",
            health_reasons=(reason,),
            allocatable=False,
        )


def _raise_if_fatal(err: pynvml.NVMLError) -> None:
    # Fatal for the GPU (lost) or for the whole read (NVML stopped); anything else
    # (NOT_SUPPORTED, NO_PERMISSION, FUNCTION_NOT_FOUND, ...) only costs one field.
    if err.value in _LOST_REASONS:
        raise _Lost(_LOST_REASONS[err.value]) from err
    if err.value == pynvml.NVML_ERROR_UNINITIALIZED:
        raise _Stopped from err
