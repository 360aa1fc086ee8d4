"""The NVML event API of the fake (``tests.fakes.nvml``): XID events per GPU.

A mixin of :class:`~tests.fakes.nvml.FakeNvml`, which provides ``event_sets``,
``_events_lock``, ``_session``, ``_system`` and ``_gpu``.
"""

from __future__ import annotations

import queue
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pynvml
from pynvml import NVMLError


@dataclass(frozen=True)
class FakeHandle:
    """What ``nvmlDeviceGetHandleByIndex`` returns: an index in one init session."""

    index: int
    session: int
    mig: int | None = None  # the slot, for a MIG instance's handle


class FakeEventSet:
    """What ``nvmlEventSetCreate`` returns: registered GPUs and a queue of events."""

    def __init__(self) -> None:
        self.registered: dict[int, int] = {}  # GPU index → event type mask
        self.events: queue.Queue[SimpleNamespace] = queue.Queue()
        self.freed = False


class FakeNvmlEvents:
    event_sets: list[FakeEventSet]
    _events_lock: Any
    _session: int

    def _system(self, call: str) -> None:
        raise NotImplementedError

    def _gpu(self, handle: FakeHandle, call: str) -> Any:
        raise NotImplementedError

    def xid(self, index: int, code: int) -> int:
        """GPU ``index`` reports XID ``code``; returns to how many event sets it went."""
        with self._events_lock:
            targets = [
                es
                for es in self.event_sets
                if not es.freed
                and es.registered.get(index, 0) & pynvml.nvmlEventTypeXidCriticalError
            ]
        for es in targets:
            es.events.put(
                SimpleNamespace(
                    device=FakeHandle(index, self._session),
                    eventType=pynvml.nvmlEventTypeXidCriticalError,
                    eventData=code,
                    gpuInstanceId=0xFFFFFFFF,
                    computeInstanceId=0xFFFFFFFF,
                )
            )
        return len(targets)

    # -- events --------------------------------------------------------------------

    def nvmlEventSetCreate(self) -> FakeEventSet:
        self._system("nvmlEventSetCreate")
        event_set = FakeEventSet()
        with self._events_lock:
            self.event_sets.append(event_set)
        return event_set

    def nvmlDeviceRegisterEvents(
        self, handle: FakeHandle, event_types: int, event_set: FakeEventSet
    ) -> None:
        gpu = self._gpu(handle, "nvmlDeviceRegisterEvents")
        if event_set.freed or event_set not in self.event_sets:
            raise NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if not gpu.events_supported:
            raise NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        with self._events_lock:
            event_set.registered[handle.index] = (
                event_set.registered.get(handle.index, 0) | event_types
            )

    def nvmlEventSetWait_v2(self, event_set: FakeEventSet, timeoutms: int) -> SimpleNamespace:
        self._system("nvmlEventSetWait_v2")
        if event_set.freed:
            raise NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        try:
            return event_set.events.get(timeout=timeoutms / 1000)
        except queue.Empty:
            raise NVMLError(pynvml.NVML_ERROR_TIMEOUT) from None

    def nvmlEventSetFree(self, event_set: FakeEventSet) -> None:
        self._system("nvmlEventSetFree")
        event_set.freed = True
