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

Deliberately not used: thermal and power throttling (DCGM warns on them, but a GPU at
its power cap under load is working as designed, and a verdict that flaps with load
would take GPUs in and out of allocation); PCIe replay and NVLink error *rates*, which
need samples on a fixed interval rather than one poll; and XID events (critical XIDs
such as 48, 79, 94/95, 119 arrive only through ``nvmlEventSetWait`` on a dedicated
thread, not by polling; their lasting effects show up above as lost, ECC counts, or
pending retirement/remapping).

:class:`NvmlBackend` does not log: everything it learns is in the inventory, and its
caller (the daemon, the ``gpus`` command) decides what is worth saying.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import pynvml

from agent.gpu.base import GpuInfo, GpuInventory, HealthSignals, judge_health

INIT_RETRY_S = 30.0
_MIB = 1024 * 1024

_LOST_REASONS = {
    pynvml.NVML_ERROR_GPU_IS_LOST: "GPU is lost (fallen off the bus)",
    pynvml.NVML_ERROR_RESET_REQUIRED: "GPU needs a reset before it can be used again",
}
_INIT_REASONS = {
    pynvml.NVML_ERROR_LIBRARY_NOT_FOUND: (
        "NVIDIA driver not found: libnvidia-ml.so.1 could not be loaded"
    ),
    pynvml.NVML_ERROR_DRIVER_NOT_LOADED: (
        "NVIDIA driver not loaded: the nvidia kernel module is not running"
    ),
    pynvml.NVML_ERROR_NO_PERMISSION: (
        "no permission to use the NVIDIA driver: the agent's user cannot open /dev/nvidia*"
    ),
    pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH: (
        "NVIDIA driver version mismatch: the kernel module and libnvidia-ml.so differ"
        " (reboot, or reload the driver, after a driver upgrade)"
    ),
}


class NvmlApi(Protocol):
    """The part of the ``pynvml`` module this backend calls (what a fake must provide).

    Failures are raised as ``pynvml.NVMLError`` subclasses carrying the NVML code in
    ``.value``.
    """

    def nvmlInit(self) -> None: ...
    def nvmlShutdown(self) -> None: ...
    def nvmlSystemGetDriverVersion(self) -> Any: ...
    def nvmlSystemGetCudaDriverVersion_v2(self) -> Any: ...
    def nvmlDeviceGetCount(self) -> Any: ...
    def nvmlDeviceGetHandleByIndex(self, index: int, /) -> Any: ...
    def nvmlDeviceGetUUID(self, handle: Any, /) -> Any: ...
    def nvmlDeviceGetName(self, handle: Any, /) -> Any: ...
    def nvmlDeviceGetPciInfo(self, handle: Any, /) -> Any: ...
    def nvmlDeviceGetMemoryInfo(self, handle: Any, /) -> Any: ...
    def nvmlDeviceGetUtilizationRates(self, handle: Any, /) -> Any: ...
    def nvmlDeviceGetTemperature(self, handle: Any, sensor: int, /) -> Any: ...
    def nvmlDeviceGetPowerUsage(self, handle: Any, /) -> Any: ...
    def nvmlDeviceGetTotalEccErrors(self, handle: Any, kind: int, counter: int, /) -> Any: ...
    def nvmlDeviceGetMigMode(self, handle: Any, /) -> Any: ...
    def nvmlDeviceGetRetiredPagesPendingStatus(self, handle: Any, /) -> Any: ...
    def nvmlDeviceGetRemappedRows(self, handle: Any, /) -> Any: ...
    def nvmlDeviceValidateInforom(self, handle: Any, /) -> Any: ...


def cuda_version_text(version: int) -> str:
    """NVML's CUDA driver version number as people write it: ``12040`` → ``"12.4"``."""
    return f"{version // 1000}.{version % 1000 // 10}"


def init_failure_reason(err: pynvml.NVMLError) -> str:
    """Why NVML could not start, in words, from ``nvmlInit``'s error."""
    return _INIT_REASONS.get(err.value, f"NVML could not start: {err} (NVML error {err.value})")


def _text(value: Any) -> str | None:
    # pynvml returns str for strings since 11.x but bytes before, and struct fields
    # (nvmlPciInfo_t.busId) are bytes in every version.
    if value is None:
        return None
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


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
    paces init retries.
    """

    def __init__(
        self,
        nvml: NvmlApi | None = None,
        *,
        retry_init_s: float = INIT_RETRY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._nvml: NvmlApi = nvml if nvml is not None else pynvml
        self._retry_init_s = retry_init_s
        self._clock = clock
        self._lock = threading.Lock()
        self._started = False
        self._failure: GpuInventory | None = None
        self._failed_at = 0.0
        # Identity of each index as last read in this NVML session, so that a GPU that
        # is lost later is still reported as *which* GPU it was. Indexes are stable
        # within a session; the map is cleared whenever NVML starts again.
        self._identity: dict[int, _Identity] = {}

    def snapshot(self) -> GpuInventory:
        """The inventory now; see the module docstring. Never raises ``NVMLError``."""
        with self._lock:
            # Second round only if NVML was shut down under us mid-read: start it again.
            for _ in range(2):
                failure = self._start()
                if failure is not None:
                    return failure
                try:
                    return self._read_inventory()
                except _Stopped:
                    self._started = False
            return GpuInventory.unavailable("NVML keeps shutting down while being read")

    def close(self) -> None:
        """Shut NVML down if this backend started it. Idempotent."""
        with self._lock:
            if self._started:
                self._started = False
                # Failing means already shut down (a driver that went away): nothing to release.
                with contextlib.suppress(pynvml.NVMLError):
                    self._nvml.nvmlShutdown()
            self._failure = None

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
        self._identity.clear()
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
        gpus = tuple(self._read_gpu(i, driver, cuda) for i in range(count))
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

    def _get(self, call: Callable[..., Any], *args: Any) -> Any:
        """``call(*args)``, or ``None`` when NVML cannot give this value."""
        try:
            return call(*args)
        except pynvml.NVMLError as err:
            _raise_if_fatal(err)
            return None

    def _read_gpu(self, index: int, driver: str | None, cuda: str | None) -> GpuInfo:
        nvml, get = self._nvml, self._get
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
        except pynvml.NVMLError as err:
            if err.value == pynvml.NVML_ERROR_UNINITIALIZED:
                raise _Stopped from err
            reason = _LOST_REASONS.get(err.value, f"NVML cannot open this GPU: {err}")
            return self._lost_gpu(index, driver, cuda, reason)
        try:
            memory = get(nvml.nvmlDeviceGetMemoryInfo, handle)
            pci = get(nvml.nvmlDeviceGetPciInfo, handle)
            identity = _Identity(
                uuid=_text(get(nvml.nvmlDeviceGetUUID, handle)),
                name=_text(get(nvml.nvmlDeviceGetName, handle)),
                pci_bus_id=_text(pci.busId) if pci is not None else None,
                memory_total_mib=int(memory.total) // _MIB if memory is not None else None,
            )
            self._identity[index] = identity
            utilization = get(nvml.nvmlDeviceGetUtilizationRates, handle)
            temperature = get(nvml.nvmlDeviceGetTemperature, handle, pynvml.NVML_TEMPERATURE_GPU)
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
        except _Lost as lost:
            return self._lost_gpu(index, driver, cuda, lost.reason)
        health, reasons = judge_health(signals)
        return GpuInfo(
            index=index,
            uuid=identity.uuid,
            name=identity.name,
            memory_total_mib=identity.memory_total_mib,
            memory_used_mib=int(memory.used) // _MIB if memory is not None else None,
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
            allocatable=health == "ok",
        )

    def _inforom_corrupted(self, handle: Any) -> bool | None:
        # The check answers by raising, so it cannot go through _get.
        try:
            self._nvml.nvmlDeviceValidateInforom(handle)
        except pynvml.NVMLError as err:
            if err.value == pynvml.NVML_ERROR_CORRUPTED_INFOROM:
                return True
            _raise_if_fatal(err)
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
