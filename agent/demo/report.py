"""What the demo prints: numbered steps with timings, and the engine's isolation settings
rendered for a person. Pure formatting over a text stream; no I/O beyond writing to it.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TextIO


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


class Steps:
    """``step(title)`` prints ``[  1.2 s] 3. title``; ``line(text)`` an indented detail.
    Times are from the start of the demo (one clock, monotonic)."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.started = time.monotonic()
        self.count = 0
        self.timings: list[tuple[str, float]] = []
        self._step_started = self.started

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def step(self, title: str) -> None:
        self._close_step()
        self.count += 1
        self._step_started = time.monotonic()
        self.timings.append((title, 0.0))
        self.out.write(f"\n[{self.elapsed():6.1f} s] {self.count}. {title}\n")
        self.out.flush()

    def line(self, text: str = "") -> None:
        self.out.write(f"    {text}\n" if text else "\n")
        self.out.flush()

    def lines(self, texts: Iterable[str]) -> None:
        for text in texts:
            self.line(text)

    def _close_step(self) -> None:
        if self.timings:
            title, _ = self.timings[-1]
            self.timings[-1] = (title, time.monotonic() - self._step_started)

    def finish(self) -> list[tuple[str, float]]:
        self._close_step()
        return list(self.timings)


def isolation_lines(summary: Mapping[str, Any]) -> list[str]:
    """``Runtime.applied_isolation`` for a person, one setting per line."""
    hc: Mapping[str, Any] = summary.get("host_config") or {}
    cpus = (hc.get("NanoCpus") or 0) / 1e9
    memory = hc.get("Memory") or 0
    lines = [
        f"network        {hc.get('NetworkMode')} (attached networks: "
        f"{', '.join(summary.get('networks') or []) or 'none'})",
        f"root fs        {'read-only' if hc.get('ReadonlyRootfs') else 'WRITABLE'}",
        f"capabilities   drop {','.join(hc.get('CapDrop') or []) or '-'}, "
        f"add {','.join(hc.get('CapAdd') or []) or 'none'}",
        f"privileged     {bool(hc.get('Privileged'))}; security_opt "
        f"{', '.join(hc.get('SecurityOpt') or []) or '-'}",
        f"user           {summary.get('user')}",
        f"limits         {cpus:g} CPU, {human_size(int(memory))} memory, "
        f"{hc.get('PidsLimit')} processes",
    ]
    for mount in summary.get("mounts") or []:
        mode = "read-write" if mount.get("rw") else "read-only"
        lines.append(f"mount          {mount.get('target'):<12} {mount.get('type')}, {mode}")
    for target in sorted(hc.get("Tmpfs") or {}):
        lines.append(f"mount          {target:<12} tmpfs ({hc['Tmpfs'][target]})")
    return lines


def isolation_problems(summary: Mapping[str, Any]) -> list[str]:
    """What the demo claims about the job container, checked against the engine's own
    report: any difference is a failure of the demo, not a footnote."""
    hc: Mapping[str, Any] = summary.get("host_config") or {}
    problems = []
    if hc.get("NetworkMode") != "none" or summary.get("networks") not in ([], ["none"]):
        problems.append(f"network is {hc.get('NetworkMode')}, not none")
    if not hc.get("ReadonlyRootfs"):
        problems.append("the root filesystem is writable")
    if "ALL" not in (hc.get("CapDrop") or []):
        problems.append("capabilities are not all dropped")
    if hc.get("Privileged"):
        problems.append("the container is privileged")
    user = str(summary.get("user") or "")
    if user.split(":")[0] in ("", "0", "root"):
        problems.append(f"the job runs as {user or 'the image default (root)'}")
    for mount in summary.get("mounts") or []:
        if mount.get("target") in ("/opt/data", "/opt/model") and mount.get("rw"):
            problems.append(f"{mount.get('target')} is mounted read-write")
    return problems
