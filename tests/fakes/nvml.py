"""A fake of the ``pynvml`` module, with real state, for nodes that have no GPU.

Hand it to the backend in place of the module::

    fake = two_gpu_fake()
    backend = NvmlBackend(fake)
    fake.gpus[1].fail("nvmlDeviceGetPowerUsage", NVML_ERROR_NOT_SUPPORTED)
    fake.gpus[1].lose()                 # fell off the bus: every call for it fails
    FakeNvml(driver_missing=True)       # no libnvidia-ml.so.1 on this node

It behaves like the library where the backend could notice the difference:

- Errors are the real ``pynvml`` exceptions (``pynvml.NVMLError(code)`` builds the
  subclass, e.g. ``NVMLError_GpuIsLost``), with the NVML code in ``.value``.
- Every call but ``nvmlInit`` raises ``UNINITIALIZED`` before ``nvmlInit`` and after the
  matching ``nvmlShutdown``; init and shutdown are reference-counted, as in NVML.
- Handles belong to one init session: one used after NVML was shut down and started
  again raises ``INVALID_ARGUMENT`` (real NVML leaves that undefined; a backend must not
  rely on it). So does an index past the last GPU.
- A capability a GPU model lacks is ``None`` in :class:`FakeGpu` and answers
  ``NOT_SUPPORTED``, e.g. page retirement on an H100 (it remaps rows instead).
- State is in NVML's units (bytes, milliwatts, CUDA ``12040``); strings come back as
  ``str`` as in current ``nvidia-ml-py``, or as ``bytes`` with ``legacy_bytes=True`` as
  in old ones; ``nvmlPciInfo_t.busId`` is ``bytes`` either way, as in every version.

MIG: ``FakeGpu(mig_enabled=True, mig_instances={0: FakeMig(...)})``; slots not in the
dict answer ``NOT_FOUND``, as empty slots do. XID events: ``fake.xid(index, 79)`` posts
one to every event set that registered that GPU; ``nvmlEventSetWait_v2`` blocks until
one arrives or its timeout passes (then ``TIMEOUT``), as the real call does.
``old_driver=True`` is a driver before 510: no ``nvmlDeviceGetMemoryInfo_v2`` and no
``nvmlDeviceGetTemperatureV`` (``FUNCTION_NOT_FOUND``). Memory v1 counts the
driver-reserved memory as used, v2 does not, as in NVML.

Fields may be changed between snapshots (``fake.gpus[0].temperature_c = 80``) and GPUs
added or removed (``fake.gpus.append(...)``). ``calls`` records every call by name;
``init_calls`` counts ``nvmlInit`` attempts.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pynvml
from pynvml import NVMLError

from tests.fakes.nvml_events import FakeEventSet, FakeHandle, FakeNvmlEvents

MIB = 1024 * 1024


class _Injected:
    """Failures injected by NVML function name: ``code``, for ``times`` calls or forever."""

    def __init__(self) -> None:
        self._by_call: dict[str, tuple[int, int | None]] = {}

    def add(self, call: str, code: int, times: int | None) -> None:
        if not (call.startswith("nvml") and hasattr(FakeNvml, call)):
            raise ValueError(f"FakeNvml has no {call!r}: a failure there would never happen")
        if times is not None and times < 1:
            raise ValueError("times must be at least 1 (or None for every call)")
        self._by_call[call] = (code, times)

    def clear(self, call: str | None) -> None:
        if call is None:
            self._by_call.clear()
        else:
            self._by_call.pop(call, None)

    def check(self, call: str) -> None:
        if call not in self._by_call:
            return
        code, left = self._by_call[call]
        if left == 1:
            del self._by_call[call]
        elif left is not None:
            self._by_call[call] = (code, left - 1)
        raise NVMLError(code)


@dataclass
class FakeMig:
    """One MIG instance: ``name`` is NVML's, e.g. ``"NVIDIA H100 80GB HBM3 MIG 1g.10gb"``."""

    uuid: str
    name: str = "NVIDIA H100 80GB HBM3 MIG 1g.10gb"
    memory_total_bytes: int = 9984 * MIB
    memory_used_bytes: int = 0
    memory_reserved_bytes: int = 13 * MIB


@dataclass
class FakeGpu:
    """One GPU's state. Defaults: an idle, healthy H100 80GB HBM3 (SXM)."""

    uuid: str
    name: str = "NVIDIA H100 80GB HBM3"
    pci_bus_id: str = "00000000:18:00.0"
    memory_total_bytes: int = 81559 * MIB
    memory_used_bytes: int = 4 * MIB  # by processes, without what the driver reserves
    memory_reserved_bytes: int = 519 * MIB
    utilization_pct: int | None = 0
    temperature_c: int | None = 31
    power_mw: int | None = 71_000
    ecc_volatile_uncorrected: int | None = 0  # None: no ECC (consumer GPUs)
    ecc_volatile_corrected: int = 0
    retired_pages_pending: bool | None = None  # None: no page retirement (Ampere+)
    row_remap_pending: bool | None = False  # None: no row remapping (pre-Ampere)
    row_remap_failed: bool = False
    rows_remapped_correctable: int = 0
    rows_remapped_uncorrectable: int = 0
    mig_enabled: bool | None = False  # None: not MIG-capable
    inforom_valid: bool | None = True  # None: InfoROM check not supported
    mig_instances: dict[int, FakeMig] = field(default_factory=dict)  # slot → instance
    max_mig_devices: int = 7
    events_supported: bool = True
    lost: bool = False
    _injected: _Injected = field(default_factory=_Injected, repr=False, compare=False)

    def fail(self, call: str, code: int, *, times: int | None = None) -> None:
        """Make ``call`` (a ``pynvml`` function name) raise ``NVMLError(code)`` for this
        GPU, on the next ``times`` calls or, by default, until :meth:`heal`."""
        self._injected.add(call, code, times)

    def heal(self, call: str | None = None) -> None:
        """Remove the failure injected into ``call``, or all of them."""
        self._injected.clear(call)

    def lose(self) -> None:
        """The GPU falls off the bus: from now on every call for it, handle lookup
        included, raises ``NVMLError_GpuIsLost`` (until :meth:`reset`)."""
        self.lost = True

    def reset(self) -> None:
        """A successful GPU reset: back on the bus, volatile ECC counts zeroed, pending
        page retirements and row remappings applied. Injected failures stay."""
        self.lost = False
        if self.ecc_volatile_uncorrected is not None:
            self.ecc_volatile_uncorrected = 0
        self.ecc_volatile_corrected = 0
        if self.retired_pages_pending is not None:
            self.retired_pages_pending = False
        if self.row_remap_pending is not None:
            self.row_remap_pending = False


def _supported(value: Any) -> Any:
    if value is None:
        raise NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
    return value


class FakeNvml(FakeNvmlEvents):
    """Stand-in for the ``pynvml`` module; see the module docstring."""

    def __init__(
        self,
        gpus: Iterable[FakeGpu] = (),
        *,
        driver_missing: bool = False,
        driver_version: str = "550.54.15",
        cuda_version: int = 12040,
        legacy_bytes: bool = False,
        old_driver: bool = False,
    ) -> None:
        self.gpus: list[FakeGpu] = list(gpus)
        # True: nvmlInit raises LIBRARY_NOT_FOUND, as with no driver installed. Set it to
        # False later to "install" the driver.
        self.driver_missing = driver_missing
        self.driver_version = driver_version
        self.cuda_version = cuda_version
        self.legacy_bytes = legacy_bytes
        self.old_driver = old_driver
        self.event_sets: list[FakeEventSet] = []
        self._events_lock = threading.Lock()
        self.calls: list[str] = []
        self.init_calls = 0
        self._refcount = 0
        self._session = 0
        self._injected = _Injected()

    @property
    def initialised(self) -> bool:
        """Whether NVML is started (more ``nvmlInit`` than ``nvmlShutdown`` calls)."""
        return self._refcount > 0

    def fail(self, call: str, code: int, *, times: int | None = None) -> None:
        """Make ``call`` raise ``NVMLError(code)`` library-wide (every GPU, and system
        calls such as ``nvmlInit`` or ``nvmlDeviceGetCount``), ``times`` times or until
        :meth:`heal`."""
        self._injected.add(call, code, times)

    def heal(self, call: str | None = None) -> None:
        """Remove the library-wide failure injected into ``call``, or all of them."""
        self._injected.clear(call)

    # -- library -------------------------------------------------------------------

    def nvmlInit(self) -> None:
        self.calls.append("nvmlInit")
        self.init_calls += 1
        if self.driver_missing:
            raise NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
        self._injected.check("nvmlInit")
        if self._refcount == 0:
            self._session += 1
        self._refcount += 1

    def nvmlShutdown(self) -> None:
        self._system("nvmlShutdown")
        self._refcount -= 1

    def nvmlSystemGetDriverVersion(self) -> str | bytes:
        self._system("nvmlSystemGetDriverVersion")
        return self._string(self.driver_version)

    def nvmlSystemGetCudaDriverVersion_v2(self) -> int:
        self._system("nvmlSystemGetCudaDriverVersion_v2")
        return self.cuda_version

    def nvmlDeviceGetCount(self) -> int:
        self._system("nvmlDeviceGetCount")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeHandle:
        self._system("nvmlDeviceGetHandleByIndex")
        if not 0 <= index < len(self.gpus):
            raise NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        self._live(self.gpus[index], "nvmlDeviceGetHandleByIndex")
        return FakeHandle(index, self._session)

    # -- per device ----------------------------------------------------------------

    def nvmlDeviceGetUUID(self, handle: FakeHandle) -> str | bytes:
        return self._string(self._device(handle, "nvmlDeviceGetUUID").uuid)

    def nvmlDeviceGetName(self, handle: FakeHandle) -> str | bytes:
        return self._string(self._device(handle, "nvmlDeviceGetName").name)

    def nvmlDeviceGetPciInfo(self, handle: FakeHandle) -> SimpleNamespace:
        bus_id = self._gpu(handle, "nvmlDeviceGetPciInfo").pci_bus_id.encode()
        return SimpleNamespace(busId=bus_id, busIdLegacy=bus_id[4:])

    def nvmlDeviceGetMemoryInfo(
        self, handle: FakeHandle, version: int | None = None
    ) -> SimpleNamespace:
        # pynvml calls nvmlDeviceGetMemoryInfo_v2 for any truthy version.
        name = "nvmlDeviceGetMemoryInfo_v2" if version else "nvmlDeviceGetMemoryInfo"
        if version and self.old_driver:
            self._system(name)
            raise NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
        dev = self._device(handle, "nvmlDeviceGetMemoryInfo", record=name)
        total, used = dev.memory_total_bytes, dev.memory_used_bytes
        reserved = dev.memory_reserved_bytes
        free = total - used - reserved
        if not version:  # v1: what the driver reserves counts as used
            return SimpleNamespace(total=total, used=used + reserved, free=free)
        if version != pynvml.nvmlMemory_v2:
            raise NVMLError(pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
        return SimpleNamespace(
            version=version, total=total, reserved=reserved, free=free, used=used
        )

    def nvmlDeviceGetUtilizationRates(self, handle: FakeHandle) -> SimpleNamespace:
        gpu = self._gpu(handle, "nvmlDeviceGetUtilizationRates")
        return SimpleNamespace(gpu=_supported(gpu.utilization_pct), memory=0)

    def nvmlDeviceGetTemperature(self, handle: FakeHandle, sensor: int) -> int:
        gpu = self._gpu(handle, "nvmlDeviceGetTemperature")
        if sensor != pynvml.NVML_TEMPERATURE_GPU:
            raise NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return int(_supported(gpu.temperature_c))

    def nvmlDeviceGetTemperatureV(
        self, handle: FakeHandle, sensor: int, version: int = pynvml.nvmlTemperature_v1
    ) -> int:
        if self.old_driver:
            self._system("nvmlDeviceGetTemperatureV")
            raise NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
        gpu = self._gpu(handle, "nvmlDeviceGetTemperatureV")
        if sensor != pynvml.NVML_TEMPERATURE_GPU:
            raise NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if version != pynvml.nvmlTemperature_v1:
            raise NVMLError(pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
        return int(_supported(gpu.temperature_c))

    def nvmlDeviceGetPowerUsage(self, handle: FakeHandle) -> int:
        return int(_supported(self._gpu(handle, "nvmlDeviceGetPowerUsage").power_mw))

    def nvmlDeviceGetTotalEccErrors(self, handle: FakeHandle, kind: int, counter: int) -> int:
        gpu = self._gpu(handle, "nvmlDeviceGetTotalEccErrors")
        kinds = (pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED)
        if (
            counter not in (pynvml.NVML_VOLATILE_ECC, pynvml.NVML_AGGREGATE_ECC)
            or kind not in kinds
        ):
            raise NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        uncorrected = int(_supported(gpu.ecc_volatile_uncorrected))
        # No errors before this driver load, so the aggregate count equals the volatile.
        return gpu.ecc_volatile_corrected if kind == kinds[0] else uncorrected

    def nvmlDeviceGetMigMode(self, handle: FakeHandle) -> list[int]:
        enabled = _supported(self._gpu(handle, "nvmlDeviceGetMigMode").mig_enabled)
        mode = pynvml.NVML_DEVICE_MIG_ENABLE if enabled else pynvml.NVML_DEVICE_MIG_DISABLE
        return [mode, mode]

    def nvmlDeviceGetRetiredPagesPendingStatus(self, handle: FakeHandle) -> int:
        gpu = self._gpu(handle, "nvmlDeviceGetRetiredPagesPendingStatus")
        pending = _supported(gpu.retired_pages_pending)
        return int(pynvml.NVML_FEATURE_ENABLED if pending else pynvml.NVML_FEATURE_DISABLED)

    def nvmlDeviceGetRemappedRows(self, handle: FakeHandle) -> tuple[int, int, int, int]:
        gpu = self._gpu(handle, "nvmlDeviceGetRemappedRows")
        pending = _supported(gpu.row_remap_pending)
        return (
            gpu.rows_remapped_correctable,
            gpu.rows_remapped_uncorrectable,
            int(pending),
            int(gpu.row_remap_failed),
        )

    def nvmlDeviceValidateInforom(self, handle: FakeHandle) -> None:
        if not _supported(self._gpu(handle, "nvmlDeviceValidateInforom").inforom_valid):
            raise NVMLError(pynvml.NVML_ERROR_CORRUPTED_INFOROM)

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: FakeHandle) -> int:
        gpu = self._gpu(handle, "nvmlDeviceGetMaxMigDeviceCount")
        _supported(gpu.mig_enabled)
        return gpu.max_mig_devices

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: FakeHandle, index: int) -> FakeHandle:
        gpu = self._gpu(handle, "nvmlDeviceGetMigDeviceHandleByIndex")
        if not _supported(gpu.mig_enabled):
            raise NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if not 0 <= index < gpu.max_mig_devices:
            raise NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if index not in gpu.mig_instances:
            raise NVMLError(pynvml.NVML_ERROR_NOT_FOUND)
        return FakeHandle(handle.index, handle.session, mig=index)

    # -- internals -----------------------------------------------------------------

    def _system(self, call: str) -> None:
        self.calls.append(call)
        if self._refcount == 0:
            raise NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)
        self._injected.check(call)

    def _gpu(self, handle: FakeHandle, call: str) -> FakeGpu:
        gpu = self._device(handle, call)
        if not isinstance(gpu, FakeGpu):  # a per-chip call on a MIG instance's handle
            raise NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return gpu

    def _device(self, handle: FakeHandle, call: str, record: str = "") -> FakeGpu | FakeMig:
        self._system(record or call)
        stale = not isinstance(handle, FakeHandle) or handle.session != self._session
        if stale or not 0 <= handle.index < len(self.gpus):
            raise NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        gpu = self._live(self.gpus[handle.index], call)
        if handle.mig is None:
            return gpu
        if not gpu.mig_enabled or handle.mig not in gpu.mig_instances:
            raise NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)  # MIG layout changed since
        return gpu.mig_instances[handle.mig]

    @staticmethod
    def _live(gpu: FakeGpu, call: str) -> FakeGpu:
        if gpu.lost:
            raise NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        gpu._injected.check(call)
        return gpu

    def _string(self, value: str) -> str | bytes:
        return value.encode() if self.legacy_bytes else value


def two_gpu_fake(**options: Any) -> FakeNvml:
    """Two idle, healthy H100 80GB HBM3 GPUs, indexes 0 and 1, driver 550.54.15, CUDA
    12.4. ``options`` go to :class:`FakeNvml` (e.g. ``legacy_bytes=True``)."""
    return FakeNvml(
        [
            FakeGpu(
                uuid="GPU-5e3c8a52-1a4f-4b0e-9f7d-3c2b1a0e9d01",
                pci_bus_id="00000000:18:00.0",
            ),
            FakeGpu(
                uuid="GPU-9b1d7e44-6c2a-4e8f-8a3b-5d4c3b2a1f02",
                pci_bus_id="00000000:2A:00.0",
                temperature_c=33,
                power_mw=69_500,
            ),
        ],
        **options,
    )
