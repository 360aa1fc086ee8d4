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

Loss: with an :class:`~agent.audit.anchor.Anchor` (the agent always passes the job
store's), each append also saves ``(seq, head)`` there, and opening refuses a file that
has fewer entries than the anchor or a different entry at the anchor's ``seq``. Before
each append the writer checks that its descriptor is still the file at its path: a
ledger deleted or replaced under a running agent makes every append raise
:class:`AuditError` (and log ``audit_ledger_replaced``) rather than record egress in a
file nobody will read. The caller must then not send: the uploader records before it
sends. The writer never recreates the file itself; a restart finds the loss through
the anchor and refuses to open until a person restores the ledger or starts a new one
on purpose (``audit --reset-anchor``, docs/audit.md).
"""

from __future__ import annotations

import fcntl
import os
import re
import threading
import time
from collections.abc import Mapping, Sequence
from contextlib import suppress
from pathlib import Path
from types import TracebackType
from typing import Any

import structlog

from agent.audit.anchor import Anchor, hash_of_entry, last_newline
from agent.audit.chain import (
    GENESIS,
    RESERVED,
    AuditError,
    anchor_problem,
    encode,
    line_hash,
    parse,
)
from agent.audit.egress import RESENT, SENT, SentIndex, check_range, check_result_path, check_sha256
from agent.errors import AgentError
from agent.fsutil import fsync_dir

log = structlog.get_logger(__name__)

FILENAME = "audit.jsonl"
_KIND = re.compile(r"[a-z][a-z0-9_]{0,63}")
# The config's rule for datastore names: a name can never be mistaken for a host path.
_DATASTORE = re.compile(r"[A-Za-z0-9._-]{1,64}")


def ledger_path(state_dir: Path) -> Path:
    """Where the ledger of an agent with ``state_dir`` lives."""
    return state_dir / FILENAME


class AuditLedger:
    """The hash-chained egress ledger at ``path`` (see :mod:`agent.audit`).

    Opens the file, creating it with mode 0600 (an existing file is tightened to 0600),
    and recovers the last ``seq`` and line hash from its tail without reading the rest.
    Does not create the directory. Raises :class:`AuditError` when the file cannot be
    opened, another process holds it, its last complete line is not an entry (the
    chain cannot be continued from it; ``audit --verify`` says more), or it does not
    match ``anchor`` (it was deleted, cut short or replaced). With ``anchor``, an
    anchor that lags the file (a crash between the two writes) is brought up to date;
    the ledger owns ``anchor`` and closes it, also when it raises.

    The typed helpers are the API: each takes only names, digests, counts and the
    result-relative path of a file, never data and never a host path.
    """

    def __init__(self, path: Path, anchor: Anchor | None = None) -> None:
        self.path = path
        self._lock = threading.Lock()
        # Orders "which files are recorded?" with the append that records the others.
        self._results_lock = threading.Lock()
        self._sent = SentIndex()
        self._anchor = anchor
        self._seq, self._prev, self._size = 0, GENESIS, 0  # set from the file by _open
        try:
            fd = self._open(path)
        except BaseException:
            if anchor is not None:
                anchor.close()
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
            self._check_same_file(self._fd, seq)
            self._write(self._fd, data, seq)
            self._save_anchor(self._fd, seq, prev)
            self._seq, self._prev, self._size = seq, prev, self._size + len(data)
            for entry in entries:
                self._sent.note(entry)
            # Logged under the lock so that the log's order is the ledger's: the last
            # audit_entry shipped off-box is the head to check the file against. One
            # line per append (its last entry; `entries`: how many it wrote), not per
            # entry: 10,000 result files cost 11 µs a line.
            last = entries[-1]
            log.info(
                "audit_entry",
                seq=last["seq"],
                kind=last["kind"],
                job_id=last["job_id"],
                hash=hashes[-1],
                entries=len(entries),
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
        check_sha256("model_sha256", model_sha256, optional=True)
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

    def result_file_sent(
        self, job_id: str, path: str, size: int, sha256: str
    ) -> dict[str, Any] | None:
        """:meth:`result_files_sent` for one file: its entry, ``None`` if already recorded."""
        return next(iter(self.result_files_sent(job_id, [(path, size, sha256)])), None)

    def result_files_sent(
        self, job_id: str, files: Sequence[tuple[str, int, str]]
    ) -> list[dict[str, Any]]:
        """``result_file_sent`` for each ``(path, size, sha256)`` not yet recorded for the
        job (:mod:`agent.audit.egress`), with one fsync; returns the entries written.
        Idempotent: a file is recorded once per job, however often it is sent. ``path``
        is relative to the job's output directory: ``ValueError`` otherwise."""
        for path, size, sha in files:
            check_result_path(path)
            if size < 0:
                raise ValueError(f"result size {size} is negative")
            check_sha256("sha256", sha)
        with self._results_lock:
            known = set(self.result_files_recorded(job_id))
            items: list[tuple[str, str | None, Mapping[str, Any]]] = []
            for p, size, sha in files:
                if p not in known:
                    known.add(p)
                    items.append((SENT, job_id, {"path": p, "size": size, "sha256": sha}))
            return self.append_many(items)

    def result_files_recorded(self, job_id: str) -> frozenset[str]:
        """The result paths already recorded as sent for ``job_id`` (since its last
        ``job_assigned``). Reads the file once for a job this process has not seen
        assigned (one re-adopted after a restart). Raises :class:`AuditError`."""
        with self._lock:
            if self._fd is None:
                raise AuditError(f"audit ledger {self.path} is closed")
            return self._sent.recorded(self.path, job_id)

    def result_ranges_resent(
        self, job_id: str, ranges: Sequence[tuple[str, int, int, str]]
    ) -> list[dict[str, Any]]:
        """``result_range_resent`` for each ``(path, start, end, why)``, with one fsync:
        bytes ``start <= b < end`` of a file already recorded leave again. Write it
        before those bytes go. ``ValueError`` for a bad path, an empty range or an
        unknown ``why`` (:data:`agent.audit.egress.RESEND_CAUSES`)."""
        for path, start, end, why in ranges:
            check_result_path(path)
            check_range(start, end, why)
        return self.append_many(
            [
                (RESENT, job_id, {"path": p, "start": start, "end": end, "why": why})
                for p, start, end, why in ranges
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
            if self._anchor is not None:
                self._anchor.close()
                self._anchor = None

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

    def _open(self, path: Path) -> int:
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
            fsync_dir(path.parent)  # the file itself must survive a crash, not just its bytes
            self._check_anchor(fd)
        except OSError as exc:
            os.close(fd)
            raise AuditError(f"cannot open audit ledger {path}: {exc.strerror}") from exc
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _check_same_file(self, fd: int, seq: int) -> None:
        # Entries written to an unlinked or replaced file are lost to every reader, and
        # the caller would send results whose record nobody can see.
        mine = os.fstat(fd)
        try:
            there: os.stat_result | None = os.stat(self.path, follow_symlinks=False)
        except OSError:
            there = None
        if there is None or (there.st_dev, there.st_ino) != (mine.st_dev, mine.st_ino):
            what = "deleted" if there is None else "replaced"
            log.error("audit_ledger_replaced", path=str(self.path), what=what, seq=seq)
            raise AuditError(
                f"audit ledger {self.path} was {what} while the agent had it open: entry "
                f"{seq} not written, and nothing is recorded or sent until it is restored "
                "and the agent restarted (docs/audit.md)"
            )

    def _save_anchor(self, fd: int, seq: int, head: str) -> None:
        if self._anchor is None:
            return
        try:
            self._anchor.save(seq, head)
        except AgentError as exc:
            # An entry the anchor does not cover is fine at the next open (the anchor
            # may lag), but the caller is told it failed: take it back, all or nothing.
            with suppress(OSError):
                os.ftruncate(fd, self._size)
                os.fsync(fd)
            raise AuditError(
                f"audit ledger {self.path}: entry {seq} not written: its anchor could not "
                f"be saved ({exc})"
            ) from exc

    def _check_anchor(self, fd: int) -> None:
        if self._anchor is None:
            return
        try:
            anchored = self._anchor.load()
            problem = None
            if anchored is not None:
                lagging = anchored[0] < self._seq  # a crash between file and anchor
                at = hash_of_entry(fd, self._size, self._seq, anchored[0]) if lagging else None
                problem = anchor_problem(anchored, self._seq, self._prev, at)
            if problem is None and anchored != (self._seq, self._prev):
                self._anchor.save(self._seq, self._prev)
        except AgentError as exc:
            raise AuditError(f"audit ledger {self.path}: its anchor cannot be read: {exc}") from exc
        if problem is not None:
            log.error("audit_ledger_lost", path=str(self.path), problem=problem)
            raise AuditError(
                f"audit ledger {self.path}: {problem}; restore the ledger, or start a new "
                "one on purpose with `cloudbender-agent audit --reset-anchor` (docs/audit.md)"
            )

    def _recover(self, fd: int) -> tuple[int, str, int]:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            keep = last_newline(fd, size) + 1
            log.warning("audit_torn_tail_truncated", path=str(self.path), dropped_bytes=size - keep)
            os.ftruncate(fd, keep)
            os.fsync(fd)
            size = keep
        if size == 0:
            return 0, GENESIS, 0
        start = last_newline(fd, size - 1) + 1
        line = os.pread(fd, size - start, start)
        entry = parse(line)
        if entry is None:
            raise AuditError(
                f"audit ledger {self.path}: the last line is not an entry, so the chain "
                "cannot be continued; run `cloudbender-agent audit --verify`, then move "
                "the file aside to start a new ledger"
            )
        return int(entry["seq"]), line_hash(line), size
