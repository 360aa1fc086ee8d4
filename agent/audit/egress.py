"""Result egress in the ledger: each file once per job, every resend as a byte range.

An auditor adds up what left a site from two kinds of entry:

- ``result_file_sent`` (``path``, ``size``, ``sha256``): written **once per file per
  job**, before the first byte of the file leaves. It stands for the whole file,
  ``size`` bytes, however many sessions it took to send.
- ``result_range_resent`` (``path``, ``start``, ``end``, ``why``): bytes
  ``start <= b < end`` of a file already recorded are about to leave *again*: a session
  dropped and the control plane's ``result.resume`` asked for bytes the agent had
  already sent (``why`` is ``session_lost``), the agent restarted in the middle of the
  upload and cannot know how far the last run got, so the range runs to the end of the
  file (``agent_restarted``), or the control plane rejected the file and it is sent
  again from byte 0 (``rejected``).

So the bytes that left are at most ``Σ size`` (each byte counted once) plus
``Σ (end - start)`` (sent again). Both entries are written before the bytes they
describe go: an over-statement is honest, a hole is not.

:class:`SentIndex` answers "which files of this job are already recorded?" without
reading the whole ledger for every job: a job assigned while the agent runs is known
from its ``job_assigned`` on; only a job re-adopted after a restart costs one scan of
the file (lines of other jobs are skipped before they are parsed).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent.audit.chain import AuditError, parse

SENT = "result_file_sent"
RESENT = "result_range_resent"
# Why a range leaves again (module docstring).
RESEND_CAUSES = frozenset({"session_lost", "agent_restarted", "rejected"})
_SHA256 = re.compile(r"[0-9a-f]{64}")


def check_sha256(name: str, value: str | None, *, optional: bool = False) -> None:
    """``ValueError`` unless ``value`` is a sha256 hex digest (``sha256:`` allowed)."""
    if value is None and optional:
        return
    if value is None or not _SHA256.fullmatch(value.removeprefix("sha256:")):
        raise ValueError(f"{name} {value!r} is not a sha256 hex digest")


def check_result_path(path: str) -> None:
    """``ValueError`` unless ``path`` is relative to the job's output directory."""
    # PurePosixPath(path).parts without the object (10,000 result files): "." and empty
    # parts fold away, so "./a" is "a" and "." is nothing.
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if not parts or path.startswith("/") or ".." in parts or "\\" in path:
        raise ValueError(f"result path {path!r} is not relative to the output directory")


def check_range(start: int, end: int, why: str) -> None:
    """``ValueError`` unless ``0 <= start < end`` and ``why`` is a known cause."""
    if not 0 <= start < end:
        raise ValueError(f"resent range [{start}, {end}) is empty or negative")
    if why not in RESEND_CAUSES:
        raise ValueError(f"resend cause {why!r} is not one of {sorted(RESEND_CAUSES)}")


class SentIndex:
    """The result paths recorded as sent, per job, since the job's last ``job_assigned``.

    Not thread-safe: the ledger calls it under its own lock, which also keeps the file
    still while :meth:`recorded` scans it.
    """

    def __init__(self) -> None:
        self._jobs: dict[str, set[str]] = {}

    def recorded(self, ledger: Path, job_id: str) -> frozenset[str]:
        """The paths of ``job_id`` already recorded in ``ledger``. Raises
        :class:`AuditError` when the file cannot be read or holds a line that is not an
        entry (``audit --verify`` says more)."""
        if job_id not in self._jobs:
            try:
                self._jobs[job_id] = _scan(ledger, job_id)
            except OSError as exc:
                raise AuditError(f"audit ledger {ledger}: cannot be read: {exc}") from exc
        return frozenset(self._jobs[job_id])

    def note(self, entry: Mapping[str, Any]) -> None:
        """Keep the index up to date with an entry just made durable."""
        job_id, kind = entry.get("job_id"), entry.get("kind")
        if not isinstance(job_id, str):
            return
        if kind == "job_assigned":
            self._jobs[job_id] = set()  # a new job (or a new run of the id) starts empty
        elif kind == "job_ended":
            self._jobs.pop(job_id, None)  # nothing of it is sent any more: free the memory
        elif kind == SENT and job_id in self._jobs:
            # An unknown job stays unknown: its earlier entries are still only in the file.
            self._jobs[job_id].add(str(entry.get("path")))


def _scan(ledger: Path, job_id: str) -> set[str]:
    # Lines are canonical JSON, so the job's own lines contain exactly this text.
    needle = b'"job_id":' + json.dumps(job_id).encode("ascii") + b","
    found: set[str] = set()
    try:
        f = ledger.open("rb")
    except FileNotFoundError:
        return found
    with f:
        for number, line in enumerate(f, start=1):
            if needle not in line or not line.endswith(b"\n"):
                continue
            entry = parse(line)
            if entry is None:
                raise AuditError(f"audit ledger {ledger}: line {number} is not a ledger entry")
            if entry.get("job_id") != job_id:
                continue
            if entry["kind"] == "job_assigned":
                found = set()
            elif entry["kind"] == SENT:
                found.add(str(entry.get("path")))
    return found
