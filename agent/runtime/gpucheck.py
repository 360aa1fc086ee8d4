"""After start: did the container get exactly its leased GPUs, and no others?

The read-back of ``agent.runtime.verify`` sees only the request in HostConfig; whether
the toolkit honoured it shows only in the running container. Every NVIDIA GPU is the
character device major 195 with the driver's minor number (``/dev/nvidia<minor>``;
254 is nvidia-modeset and 255 nvidiactl, which are no GPU), so the check compares
the GPU minors the container may open with the minors of the leased UUIDs.

Where the container's device access is read from:

* cgroup v1: the ``devices.list`` of the container's device cgroup (found through
  ``/proc/<pid>/cgroup``), readable by anyone.
* cgroup v2 keeps the list in an eBPF program that cannot simply be read back; then
  the device nodes in the container's ``/dev`` (``/proc/<pid>/root/dev``), which the
  hook or the CDI edits create for the granted GPUs only. That needs the agent to be
  allowed into the container's root (root, or CAP_SYS_PTRACE); where it is not, the
  check says it could not verify, and the job keeps the read-back's guarantee only.

UUID → minor comes from the driver's ``/proc/driver/nvidia/gpus/*/information``
(``GPU UUID`` and ``Device Minor``), the same number NVML's ``nvmlDeviceGetMinorNumber``
gives. A MIG instance has no minor of its own and is not checked here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

NVIDIA_MAJOR = 195
NOT_GPU_MINORS = frozenset({254, 255})  # nvidia-modeset, nvidiactl
DRIVER_GPUS = Path("/proc/driver/nvidia/gpus")
_ENTRY = re.compile(r"([abc]) (\*|\d+):(\*|\d+) ([rwm]+)")
_NODE = re.compile(r"nvidia(\d+)")


@dataclass(frozen=True)
class DeviceAccess:
    """The GPU minors a container may open; ``all_gpus`` when a wildcard grants every one.
    ``source`` says where it was read."""

    minors: frozenset[int]
    all_gpus: bool
    source: str


def driver_minors(root: Path = DRIVER_GPUS) -> dict[str, int]:
    """GPU UUID → device minor, from the driver's proc files (empty without a driver)."""
    found: dict[str, int] = {}
    try:
        entries = sorted(root.iterdir())
    except OSError:
        return found
    for entry in entries:
        try:
            text = (entry / "information").read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        uuid, minor = fields.get("GPU UUID", "").strip(), fields.get("Device Minor", "").strip()
        if uuid and minor.isdigit():
            found[uuid] = int(minor)
    return found


def parse_devices_list(text: str, source: str) -> DeviceAccess:
    """The GPU minors a cgroup v1 ``devices.list`` lets the container read or write.
    Entries that allow only ``m`` (mknod, Docker's ``c *:* m``) open nothing."""
    minors: set[int] = set()
    everything = False
    for line in text.splitlines():
        match = _ENTRY.fullmatch(line.strip())
        if match is None or not set(match.group(4)) & {"r", "w"}:
            continue
        kind, major, minor = match.group(1), match.group(2), match.group(3)
        if kind == "b" or major not in ("*", str(NVIDIA_MAJOR)):
            continue
        if minor == "*":
            everything = True
        elif int(minor) not in NOT_GPU_MINORS:
            minors.add(int(minor))
    return DeviceAccess(frozenset(minors), everything, source)


def _cgroup_v1_devices(pid: int, proc: Path, cgroup_root: Path) -> DeviceAccess | None:
    try:
        lines = (proc / str(pid) / "cgroup").read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3 and "devices" in parts[1].split(","):
            if parts[2].strip("/") == "":
                # A container is never in the root cgroup; an exited process shows it.
                return None
            path = cgroup_root / "devices" / parts[2].lstrip("/") / "devices.list"
            try:
                return parse_devices_list(path.read_text(encoding="utf-8"), str(path))
            except OSError:
                return None
    return None  # cgroup v2: no devices controller line


def _dev_nodes(pid: int, proc: Path) -> DeviceAccess | None:
    dev = proc / str(pid) / "root" / "dev"
    try:
        names = [p.name for p in dev.iterdir()]
    except OSError:
        return None
    minors = {int(m.group(1)) for n in names if (m := _NODE.fullmatch(n))}
    return DeviceAccess(frozenset(minors), False, f"the device nodes in {dev}")


def container_access(
    pid: int, *, proc: Path = Path("/proc"), cgroup_root: Path = Path("/sys/fs/cgroup")
) -> DeviceAccess | None:
    """What the container with main process ``pid`` may open; ``None`` if unreadable."""
    return _cgroup_v1_devices(pid, proc, cgroup_root) or _dev_nodes(pid, proc)


def access_problems(
    leased: Sequence[str], minors: Mapping[str, int], access: DeviceAccess
) -> list[str]:
    """How ``access`` differs from "the leased GPUs, no others", in words; empty if it
    does not. A leased GPU UUID the driver does not list is a problem (it cannot be
    checked, and a GPU the driver does not know cannot be in the container either);
    MIG UUIDs are skipped (see the module docstring), and
    with one leased the extra parent device is not counted."""
    problems = []
    want: set[int] = set()
    # A MIG instance opens its parent's /dev/nvidia<N> too, which is then no stranger.
    mig = any(uuid.startswith("MIG-") for uuid in leased)
    for uuid in leased:
        if uuid.startswith("MIG-"):
            continue
        if uuid not in minors:
            problems.append(f"leased GPU {uuid} is not among the driver's GPUs")
        else:
            want.add(minors[uuid])
    if access.all_gpus:
        problems.append(f"the container may open every NVIDIA GPU ({access.source})")
    names = {minor: uuid for uuid, minor in minors.items()}
    for minor in sorted(want - access.minors):
        problems.append(f"leased GPU {names[minor]} (/dev/nvidia{minor}) is missing")
    for minor in sorted(access.minors - want) if not mig else ():
        other = names.get(minor, "not leased")
        problems.append(f"/dev/nvidia{minor} ({other}) is open to the container, not leased")
    return problems
