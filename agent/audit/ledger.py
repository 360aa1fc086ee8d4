"""The writer: one open, append-only, fsynced ledger file per agent.

Durability: :meth:`AuditLedger.append` returns only after the line and its fsync have
completed, so an entry the caller has seen returned survives a crash or power loss.
A crash in the middle of a write leaves at most one incomplete last line; the next open
cuts it off (it was never returned to anyone) and logs ``audit_torn_tail_truncated``.

Threads: every method may be called from any thread; one lock orders the appends. From
the event loop, call the typed helpers through ``asyncio.to_thread`` — an fsync costs
about a millisecond on an SSD, much more on a busy disk, and must not stall the loop.

Processes: the file is held with an exclusive ``flock`` while open, so a second agent
pointed at the same state directory fails to open it instead of forking the chain. The
``audit`` command only reads, and needs no lock.
"""

from __future__ import annotations

import fcntl
import os
import re
import threading
import time
from collections.abc import Mapping, Sequence
from contextlib import suppress
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Any

import structlog

from agent.audit.chain import GENESIS, RESERVED, AuditError, encode, line_hash, parse

log = structlog.get_logger(__name__)

FILENAME = "audit.jsonl"
_CHUNK = 64 * 1024
_KIND = re.compile(r"[a-z][a-z0-9_]{0,63}")
# The config's rule for datastore names: a name can never be mistaken for a host path.
_DATASTORE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def ledger_path(state_dir: Path) -> Path:
    """Where the ledger of an agent with ``state_dir`` lives."""
    return state_dir / FILENAME


class AuditLedger:
    """The hash-chained egress ledger at ``path`` (see :mod:`agent.audit`).

    Opens the file, creating it with mode 0600 (an existing file is tightened to 0600),
    and recovers the last ``seq`` and line hash from its tail without reading the rest.
    Does not create the directory. Raises :class:`AuditError` when the file cannot be
    opened, another process holds it, or its last complete line is not an entry (the
    chain cannot be continued from it; ``audit --verify`` says more).

    The typed helpers are the API: each takes only names, digests, counts and the
    result-relative path of a file, never data and never a host path.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            fd = os.open(path, flags, 0o600)
        except OSError as exc:
            raise AuditError(f"cannot open audit ledger {path}: {exc.strerror}") from exc
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                raise AuditError(f"audit ledger {path} is held by another process") from exc
            os.fchmod(fd, 0o600)
            self._seq, self._prev, self._size = self._recover(fd)
            _fsync_dir(path.parent)  # the file itself must survive a crash, not just its bytes
        except OSError as exc:
            os.close(fd)
            raise AuditError(f"cannot open audit ledger {path}: {exc.strerror}") from exc
        except BaseException:
            os.close(fd)
            raise
        self._fd: int | None = fd

    @property
    def head(self) -> tuple[int, str]:
        """``(seq, sha256)`` of the last entry; ``(0, GENESIS)`` for an empty ledger."""
        with self._lock:
            return self._seq, self._prev

    def append(self, kind: str, job_id: str | None, **fields: Any) -> dict[str, Any]:
        """Write one entry and fsync it; return it as written.

        Prefer the typed helpers. ``kind`` is ``[a-z][a-z0-9_]*``; ``fields`` must be
        JSON values and may not use the keys the ledger sets (``seq ts kind job_id
        prev``): ``ValueError`` or ``TypeError`` otherwise, and nothing is written.
        Raises :class:`AuditError` when the entry cannot be made durable; nothing of it
        is then left in the file and the chain continues from the entry before.
        """
        return self.append_many([(kind, job_id, fields)])[0]

    def append_many(
        self, items: Sequence[tuple[str, str | None, Mapping[str, Any]]]
    ) -> list[dict[str, Any]]:
        """Write several entries with one fsync (same rules as :meth:`append`).

        All or nothing: if they cannot all be made durable, none is left in the file.
        """
        if not items:
            return []
        for kind, _, fields in items:
            if not _KIND.fullmatch(kind):
                raise ValueError(f"audit entry kind {kind!r} is not [a-z][a-z0-9_]*")
            if clash := RESERVED & fields.keys():
                raise ValueError(f"audit entry fields may not set {', '.join(sorted(clash))}")
        with self._lock:
            if self._fd is None:
                raise AuditError(f"audit ledger {self.path} is closed")
            seq, prev = self._seq, self._prev
            entries, lines, hashes = [], [], []
            for kind, job_id, fields in items:
                seq += 1
                entry: dict[str, Any] = {"seq": seq, "ts": time.time(), "kind": kind}
                entry.update(fields, job_id=job_id, prev=prev)
                line = encode(entry)
                prev = line_hash(line)
                entries.append(entry)
                lines.append(line)
                hashes.append(prev)
            data = b"".join(lines)
            self._write(self._fd, data, seq)
            self._seq, self._prev, self._size = seq, prev, self._size + len(data)
            # Logged under the lock so that the log's order is the ledger's: the last
            # audit_entry shipped off-box is the head to check the file against.
            for entry, digest in zip(entries, hashes, strict=True):
                log.info(
                    "audit_entry",
                    seq=entry["seq"],
                    kind=entry["kind"],
                    job_id=entry["job_id"],
                    hash=digest,
                )
        return entries

    def job_assigned(
        self,
        job_id: str,
        image_ref: str,
        image_digest: str | None,
        model_sha256: str | None,
        datastore: str | None,
    ) -> dict[str, Any]:
        """The job was accepted. ``datastore`` is the configured name, never its path."""
        if datastore is not None and not _DATASTORE.fullmatch(datastore):
            raise ValueError(f"datastore {datastore!r} is not a datastore name")
        _check_sha256("model_sha256", model_sha256, optional=True)
        return self.append(
            "job_assigned",
            job_id,
            image_ref=image_ref,
            image_digest=image_digest,
            model_sha256=model_sha256,
            datastore=datastore,
        )

    def container_started(
        self, job_id: str, container_id: str, isolation: Mapping[str, Any]
    ) -> dict[str, Any]:
        """The container runs, with ``isolation`` as read back from the engine
        (``Runtime.applied_isolation``, which lists mounts by target, never host path)."""
        return self.append(
            "container_started", job_id, container_id=container_id, isolation=dict(isolation)
        )

    def result_file_sent(self, job_id: str, path: str, size: int, sha256: str) -> dict[str, Any]:
        """One result file went to the control plane. ``path`` is relative to the job's
        output directory: ``ValueError`` for an absolute path or one with ``..``."""
        return self.result_files_sent(job_id, [(path, size, sha256)])[0]

    def result_files_sent(
        self, job_id: str, files: Sequence[tuple[str, int, str]]
    ) -> list[dict[str, Any]]:
        """``result_file_sent`` for each ``(path, size, sha256)``, with one fsync."""
        for path, size, sha in files:
            parts = PurePosixPath(path).parts
            if not parts or path.startswith("/") or ".." in parts or "\\" in path:
                raise ValueError(f"result path {path!r} is not relative to the output directory")
            if size < 0:
                raise ValueError(f"result size {size} is negative")
            _check_sha256("sha256", sha)
        return self.append_many(
            [
                ("result_file_sent", job_id, {"path": p, "size": size, "sha256": sha})
                for p, size, sha in files
            ]
        )

    def result_accepted(self, job_id: str, files: int, total_bytes: int) -> dict[str, Any]:
        """The control plane confirmed it holds every result file of the job."""
        return self.append("result_accepted", job_id, files=files, total_bytes=total_bytes)

    def job_ended(
        self, job_id: str, state: str, reason: str | None, exit_code: int | None
    ) -> dict[str, Any]:
        """The job reached its final ``state`` (with the failure ``reason``, if any)."""
        return self.append("job_ended", job_id, state=state, reason=reason, exit_code=exit_code)

    def close(self) -> None:
        """Close the file and release the lock. Idempotent."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> AuditLedger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _write(self, fd: int, line: bytes, seq: int) -> None:
        view, done = memoryview(line), 0
        try:
            while done < len(line):
                done += os.write(fd, view[done:])
            os.fsync(fd)
        except OSError as exc:
            # A partial line left behind would be chained onto by the next append and
            # break the ledger for good: cut back to the last durable entry.
            with suppress(OSError):
                os.ftruncate(fd, self._size)
            raise AuditError(
                f"audit ledger {self.path}: entry {seq} not written: {exc.strerror}"
            ) from exc

    def _recover(self, fd: int) -> tuple[int, str, int]:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            keep = _last_newline(fd, size) + 1
            log.warning("audit_torn_tail_truncated", path=str(self.path), dropped_bytes=size - keep)
            os.ftruncate(fd, keep)
            os.fsync(fd)
            size = keep
        if size == 0:
            return 0, GENESIS, 0
        start = _last_newline(fd, size - 1) + 1
        line = os.pread(fd, size - start, start)
        entry = parse(line)
        if entry is None:
            raise AuditError(
                f"audit ledger {self.path}: the last line is not an entry, so the chain "
                "cannot be continued; run `cloudbender-agent audit --verify`, then move "
                "the file aside to start a new ledger"
            )
        return int(entry["seq"]), line_hash(line), size


def _check_sha256(name: str, value: str | None, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if value is None or not _SHA256.fullmatch(value.removeprefix("sha256:")):
        raise ValueError(f"{name} {value!r} is not a sha256 hex digest")


def _last_newline(fd: int, end: int) -> int:
    """The offset of the last ``\\n`` before ``end``, or -1. Reads backwards in chunks."""
    while end > 0:
        start = max(0, end - _CHUNK)
        at = os.pread(fd, end - start, start).rfind(b"\n")
        if at >= 0:
            return start + at
        end = start
    return -1


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
