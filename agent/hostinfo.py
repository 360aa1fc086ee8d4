"""Host CPU, memory and disk facts from psutil. Blocking calls: run them in a thread.

:meth:`HostSampler.sample` raises what psutil raises (``OSError`` such as ``EMFILE``
when the process is out of descriptors): the daemon's sampler logs it and keeps the
last sample (``agent.loops``).
"""

from __future__ import annotations

import os
import platform
from functools import cache
from pathlib import Path

import psutil

from agent.health.facts import HostSample

MIB = 1024 * 1024


@cache
def cpu_model() -> str | None:
    """The CPU's marketing name, or None where the platform does not say.

    Raises ``OSError`` when ``/proc/cpuinfo`` exists but cannot be read now (``EMFILE``):
    the answer is cached for good, so a passing failure must not become it.
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("model name", "Model")):
                    return line.split(":", 1)[1].strip() or None
    except (FileNotFoundError, PermissionError):
        pass
    return platform.processor() or None


def free_mib(path: Path) -> int | None:
    """Free space for unprivileged writers under ``path`` (or its nearest parent)."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return psutil.disk_usage(str(probe)).free // MIB
    except OSError:
        return None


class HostSampler:
    """Samples the host. Not thread-safe: one owner calls :meth:`sample`."""

    def __init__(self, state_dir: Path) -> None:
        self._state_dir = state_dir
        # psutil's first cpu_percent(None) has nothing to compare with and returns 0.0,
        # which would be a made-up number: the first sample reports None instead.
        self._primed = False

    def sample(self) -> HostSample:
        """One sample; ``cpu_pct`` is utilisation since the previous call."""
        cpu_pct: float | None = psutil.cpu_percent(interval=None)
        if not self._primed:
            self._primed, cpu_pct = True, None
        memory = psutil.virtual_memory()
        return HostSample(
            cpu_logical=psutil.cpu_count(logical=True) or os.cpu_count() or 1,
            cpu_model=cpu_model(),
            cpu_pct=cpu_pct,
            memory_total_mib=memory.total // MIB,
            memory_used_mib=(memory.total - memory.available) // MIB,
            state_dir_free_mib=free_mib(self._state_dir),
        )
