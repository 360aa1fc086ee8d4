"""XID events: the driver's own error reports, watched through NVML's event API.

An XID is a numbered error the NVIDIA driver logs when a GPU misbehaves (XID 79: the
GPU fell off the bus; 74: an NVLink error; 119/120: the GSP firmware timed out). They
are not visible by polling: NVML hands them out only through an event set that a
thread waits on (``nvmlEventSetCreate``, ``nvmlDeviceRegisterEvents`` with
``nvmlEventTypeXidCriticalError``, ``nvmlEventSetWait_v2``). :class:`XidWatcher` is that
thread, owned by :class:`agent.gpu.nvml.NvmlBackend`.

Which XIDs count is the rule of DCGM and NVIDIA's k8s-device-plugin: every critical XID
marks its GPU unhealthy except :data:`IGNORED_XIDS` (13, 31, 43, 45, 68, 109), which are
errors of the application (an illegal address, a killed context) rather than of the
GPU. :data:`LOST_XIDS` (79, fallen off the bus) make the GPU ``lost``; any other
counted XID makes it ``degraded``. Either way it is no longer allocatable.

A verdict is sticky for the life of the agent process: the driver does not say when an
XID's effect is over, and only a GPU reset clears it, which NVML does not announce to a
process that was not holding it open. So the operator resets the GPU and then restarts
the agent (docs/gpus.md, "XID events").

The watcher holds its own NVML reference (``nvmlInit``) while it runs, which keeps the
driver open: ``nvidia-smi -r`` and MIG mode changes fail then. The backend therefore
runs it only while every GPU is ``ok`` and stops it as soon as one needs attention;
see :mod:`agent.gpu.nvml` for that trade-off.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterable
from typing import Any, TypeAlias

import pynvml

from agent.gpu.base import GpuInfo, GpuInventory, Health
from agent.gpu.nvml_api import text as _text

# DCGM's and k8s-device-plugin's list of XIDs caused by the application, not the GPU.
IGNORED_XIDS = frozenset({13, 31, 43, 45, 68, 109})
# XIDs after which NVML cannot reach the GPU at all.
LOST_XIDS = frozenset({79})
_MEANING = {
    48: "double-bit ECC error",
    63: "ECC page retirement or row remapping recorded",
    64: "ECC page retirement or row remapping failed",
    74: "NVLink error",
    79: "GPU has fallen off the bus",
    92: "high single-bit ECC error rate",
    94: "contained ECC error",
    95: "uncontained ECC error",
    119: "GSP RPC timeout",
    120: "GSP error",
}
WAIT_MS = 1000  # how long one nvmlEventSetWait_v2 blocks, and so how long stop() may take


def xid_reason(xid: int) -> str:
    """What a person reads for a counted XID, with the action to take."""
    meaning = _MEANING.get(xid, "critical GPU error")
    return f"XID {xid} ({meaning}): reset the GPU, then restart the agent"


Verdicts: TypeAlias = dict[str, tuple[Health, tuple[str, ...]]]


def apply_xids(inv: GpuInventory, verdicts: Verdicts) -> GpuInventory:
    """``inv`` with each GPU that has an XID verdict made ``lost`` or ``degraded``.

    A verdict on a physical GPU (by UUID) applies to its MIG instances too
    (``parent_uuid``): they are slices of the same chip. The worse health wins; reasons
    are appended; such a GPU is not allocatable. Pure.
    """
    if not verdicts:
        return inv
    rank = {"ok": 0, "degraded": 1, "lost": 2}
    out: list[GpuInfo] = []
    for gpu in inv.gpus:
        key = gpu.parent_uuid or gpu.uuid
        verdict = verdicts.get(key) if key is not None else None
        if verdict is None:
            out.append(gpu)
            continue
        health, reasons = verdict
        worse = health if rank[health] > rank[gpu.health] else gpu.health
        new_reasons = gpu.health_reasons + tuple(r for r in reasons if r not in gpu.health_reasons)
        out.append(
            dataclasses.replace(gpu, health=worse, health_reasons=new_reasons, allocatable=False)
        )
    return dataclasses.replace(inv, gpus=tuple(out))


class XidWatcher:
    """A daemon thread waiting for XID events on every GPU NVML lists.

    ``start`` and ``stop`` are idempotent and may be called from any thread; ``stop``
    returns once the thread has let go of NVML (within about ``wait_ms``). Verdicts
    (:meth:`verdicts`) outlive stops and restarts.
    """

    def __init__(self, nvml: Any, *, wait_ms: int = WAIT_MS) -> None:
        self._nvml = nvml
        self._wait_ms = wait_ms
        self._lock = threading.Condition()
        self._verdicts: Verdicts = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._watching = False
        self._handled = 0  # events taken off the set, counted or ignored
        self._uuids: list[str] = []  # the GPUs registered by the current thread

    @property
    def running(self) -> bool:
        """Whether the thread is alive (and so holds NVML open)."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start watching unless the thread is running."""
        with self._lock:
            if self.running:
                return
            self._stop = threading.Event()
            self._watching = False
            self._thread = threading.Thread(
                target=self._run, args=(self._stop,), name="nvml-xid-watch", daemon=True
            )
            self._thread.start()

    def stop(self) -> None:
        """Stop the thread and wait until it has released NVML."""
        with self._lock:
            thread, self._thread = self._thread, None
            self._stop.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def verdicts(self) -> Verdicts:
        """Physical GPU UUID → (health, reasons) from the XIDs counted so far. A copy."""
        with self._lock:
            return dict(self._verdicts)

    def wait_watching(self, timeout: float) -> bool:
        """Block until events are registered (or the thread gave up); for tests and
        tools that inject an event right after ``start``."""
        with self._lock:
            return self._lock.wait_for(lambda: self._watching or not self.running, timeout)

    def wait_handled(self, count: int, timeout: float) -> bool:
        """Block until ``count`` events have been handled in total, or ``timeout``."""
        with self._lock:
            return self._lock.wait_for(lambda: self._handled >= count, timeout)

    # -- the thread ------------------------------------------------------------------

    def _run(self, stop: threading.Event) -> None:
        nvml = self._nvml
        try:
            nvml.nvmlInit()
        except pynvml.NVMLError:
            self._set_watching()  # nothing to watch; the snapshot reports the driver
            return
        try:
            event_set = nvml.nvmlEventSetCreate()
            try:
                uuids = self._register(event_set)
                self._set_watching()
                if uuids:
                    self._wait_loop(event_set, uuids, stop)
            finally:
                with contextlib.suppress(pynvml.NVMLError):
                    nvml.nvmlEventSetFree(event_set)
        except pynvml.NVMLError as err:
            self._set_watching()
            self._mark(self._known_uuids(), "degraded", _wait_failed(err))
        finally:
            with contextlib.suppress(pynvml.NVMLError):
                nvml.nvmlShutdown()

    def _register(self, event_set: Any) -> list[str]:
        """Register every GPU that supports XID events; their UUIDs."""
        nvml, uuids = self._nvml, []
        for index in range(int(nvml.nvmlDeviceGetCount())):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                uuid = _text(nvml.nvmlDeviceGetUUID(handle))
                if uuid is None:
                    continue
                nvml.nvmlDeviceRegisterEvents(
                    handle, pynvml.nvmlEventTypeXidCriticalError, event_set
                )
            except pynvml.NVMLError:
                continue  # no XID events on this GPU (NOT_SUPPORTED) or it is lost: polled
            uuids.append(uuid)
        with self._lock:
            self._uuids = list(uuids)
        return uuids

    def _wait_loop(self, event_set: Any, uuids: list[str], stop: threading.Event) -> None:
        nvml = self._nvml
        while not stop.is_set():
            try:
                data = nvml.nvmlEventSetWait_v2(event_set, self._wait_ms)
            except pynvml.NVMLError as err:
                if err.value == pynvml.NVML_ERROR_TIMEOUT:
                    continue
                # As k8s-device-plugin does: a wait that fails means XIDs can no longer be
                # seen, so no GPU can be vouched for. The backend then stops this thread.
                self._mark(uuids, "degraded", _wait_failed(err))
                return
            self._handle(data, uuids)

    def _handle(self, data: Any, uuids: list[str]) -> None:
        xid = int(data.eventData)
        if int(data.eventType) == pynvml.nvmlEventTypeXidCriticalError and xid not in IGNORED_XIDS:
            targets: list[str | None]
            try:
                targets = [_text(self._nvml.nvmlDeviceGetUUID(data.device))]
            except pynvml.NVMLError:
                targets = list(uuids)  # cannot tell which GPU: all of them, as k8s-device-plugin
            health: Health = "lost" if xid in LOST_XIDS else "degraded"
            self._mark(targets, health, xid_reason(xid))
        with self._lock:
            self._handled += 1
            self._lock.notify_all()

    def _mark(self, uuids: Iterable[str | None], health: Health, reason: str) -> None:
        with self._lock:
            for uuid in uuids:
                if uuid is None:
                    continue
                old_health, old_reasons = self._verdicts.get(uuid, ("ok", ()))
                worse: Health = "lost" if "lost" in (old_health, health) else "degraded"
                reasons = old_reasons if reason in old_reasons else (*old_reasons, reason)
                self._verdicts[uuid] = (worse, reasons)
            self._lock.notify_all()

    def _known_uuids(self) -> list[str]:
        with self._lock:
            return list(self._uuids)

    def _set_watching(self) -> None:
        with self._lock:
            self._watching = True
            self._lock.notify_all()


def _wait_failed(err: pynvml.NVMLError) -> str:
    return f"NVML's XID event wait failed ({err}): XID errors can no longer be seen"
