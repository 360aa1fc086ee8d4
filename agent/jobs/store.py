"""The durable job store: SQLite (WAL) in the state directory.

Holds every job the control plane has not yet acknowledged, and the ids of ended jobs
for at least :data:`REMEMBER_S` (7 days, docs/protocol.md §4), so that a repeated
``job.assign`` is answered ``duplicate_job`` even after a restart. Credentials are
never stored: the assignment is kept without ``image.auth``.

Every write commits with ``synchronous=FULL``: a state the agent has reported must
survive a power cut. Writes are small and rare (one per job transition), so they run
on the caller's thread; the store is used by the daemon's event loop only.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.errors import AgentError
from agent.jobs.joblogs import logs_dir, remove_logs
from agent.jobs.model import State

REMEMBER_S = 7 * 24 * 3600
SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id       TEXT PRIMARY KEY,
    state        TEXT NOT NULL,
    reason       TEXT,
    exit_code    INTEGER,
    assignment   TEXT NOT NULL,
    container_id TEXT,
    gpu_uuids    TEXT NOT NULL DEFAULT '[]',
    created_at   REAL NOT NULL,
    updated_at   REAL NOT NULL,
    ended_at     REAL,
    acked_at     REAL
);
CREATE INDEX IF NOT EXISTS jobs_unacked ON jobs (acked_at) WHERE acked_at IS NULL;
"""


class StoreError(AgentError):
    """The job store cannot be opened or written (disk full, read-only, corrupt)."""


@dataclass
class JobRecord:
    job_id: str
    state: State
    assignment: dict[str, Any]
    created_at: float
    updated_at: float
    reason: str | None = None
    exit_code: int | None = None
    container_id: str | None = None
    gpu_uuids: tuple[str, ...] = ()
    ended_at: float | None = None
    acked_at: float | None = None


def _connect(path: Path, schema: str, *, check_same_thread: bool = True) -> sqlite3.Connection:
    """The store's database in WAL mode with ``synchronous=FULL``, ``schema`` applied,
    the file owner-only. Raises :class:`StoreError`."""
    try:
        db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=check_same_thread)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(schema)
    except sqlite3.Error as exc:
        raise StoreError(f"job store {path} cannot be opened: {exc}") from exc
    path.chmod(0o600)
    return db


def _row(row: sqlite3.Row) -> JobRecord:
    return JobRecord(
        job_id=row["job_id"],
        state=State(row["state"]),
        assignment=json.loads(row["assignment"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        reason=row["reason"],
        exit_code=row["exit_code"],
        container_id=row["container_id"],
        gpu_uuids=tuple(json.loads(row["gpu_uuids"])),
        ended_at=row["ended_at"],
        acked_at=row["acked_at"],
    )


class JobStore:
    def __init__(self, path: Path) -> None:
        self._path = path
        self._db = _connect(path, SCHEMA)
        self._db.row_factory = sqlite3.Row

    def close(self) -> None:
        self._db.close()

    def _write(self, sql: str, args: tuple[Any, ...]) -> None:
        try:
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute(sql, args)
        except sqlite3.Error as exc:
            raise StoreError(f"job store write failed: {exc}") from exc

    def insert(self, record: JobRecord) -> None:
        """Record a newly accepted job. Raises :class:`StoreError` when it cannot."""
        self._write(
            "INSERT INTO jobs (job_id, state, assignment, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?)",
            (
                record.job_id,
                record.state.value,
                json.dumps(record.assignment),
                record.created_at,
                record.updated_at,
            ),
        )

    def update(self, record: JobRecord) -> None:
        """Persist the record's state, reason, exit code, container and GPUs."""
        self._write(
            "UPDATE jobs SET state=?, reason=?, exit_code=?, container_id=?, gpu_uuids=?, "
            "updated_at=?, ended_at=?, acked_at=? WHERE job_id=?",
            (
                record.state.value,
                record.reason,
                record.exit_code,
                record.container_id,
                json.dumps(list(record.gpu_uuids)),
                record.updated_at,
                record.ended_at,
                record.acked_at,
                record.job_id,
            ),
        )

    def get(self, job_id: str) -> JobRecord | None:
        row = self._db.execute("SELECT * FROM jobs WHERE job_id=?", (job_id,)).fetchone()
        return None if row is None else _row(row)

    def unacknowledged(self) -> list[JobRecord]:
        """Jobs whose terminal state the control plane has not acknowledged, oldest first."""
        rows = self._db.execute(
            "SELECT * FROM jobs WHERE acked_at IS NULL ORDER BY created_at, job_id"
        ).fetchall()
        return [_row(r) for r in rows]

    def forget_old(self, now: float | None = None, *, keep_s: float = 0.0) -> int:
        """Drop acknowledged jobs that ended more than ``max(REMEMBER_S, keep_s)`` ago,
        and their kept logs (``<state_dir>/logs``, next to the store); return how many.

        The caller passes ``results.retention_h`` as ``keep_s``: ``jobs --all`` must
        list an ended job for at least as long as its results are kept."""
        cutoff = (time.time() if now is None else now) - max(REMEMBER_S, keep_s)
        try:
            with self._db:
                ids = [
                    str(r[0])
                    for r in self._db.execute(
                        "SELECT job_id FROM jobs WHERE acked_at IS NOT NULL AND ended_at < ?",
                        (cutoff,),
                    )
                ]
                self._db.execute(
                    "DELETE FROM jobs WHERE acked_at IS NOT NULL AND ended_at < ?", (cutoff,)
                )
        except sqlite3.Error as exc:
            raise StoreError(f"job store write failed: {exc}") from exc
        remove_logs(logs_dir(self._path.parent), ids)
        return len(ids)

    def writable(self) -> bool:
        """A cheap write probe for health: False when the database refuses writes."""
        try:
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error:
            return False
        return True


# The audit ledger's anchor (agent.audit.ledger): a table of its own, never touched by
# JobStore, so that the jobs table's columns stay as they are.
STORE_FILENAME = "jobs.db"
_ANCHOR_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_anchor (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    seq        INTEGER NOT NULL,
    head       TEXT NOT NULL,
    updated_at REAL NOT NULL
);
"""


def store_path(state_dir: Path) -> Path:
    """Where the job store of an agent with ``state_dir`` lives."""
    return state_dir / STORE_FILENAME


class AuditAnchor:
    """The audit ledger's entry count and head hash, kept in the job store's database.

    A ledger that was deleted, emptied, cut short or replaced still verifies on its own
    (a shorter chain is a valid chain); compared with this anchor it does not. The
    ledger calls :meth:`save` after each fsynced append, under its own lock, from
    whichever thread appended: so this class has its own connection, usable from any
    thread, and must only be used by one ledger. ``synchronous=FULL`` gives the save
    the append's durability. Raises :class:`StoreError` when the database cannot be
    opened or written.
    """

    def __init__(self, path: Path) -> None:
        self._db = _connect(path, _ANCHOR_SCHEMA, check_same_thread=False)

    def load(self) -> tuple[int, str] | None:
        """``(seq, head)`` as last saved, or ``None`` when nothing was ever saved."""
        try:
            return _anchor_row(self._db)
        except sqlite3.Error as exc:
            raise StoreError(f"job store read failed: {exc}") from exc

    def save(self, seq: int, head: str) -> None:
        """Record the ledger's new head; durable when it returns."""
        try:
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute(
                    "INSERT INTO audit_anchor (id, seq, head, updated_at) VALUES (1, ?, ?, ?) "
                    "ON CONFLICT (id) DO UPDATE SET seq=excluded.seq, head=excluded.head, "
                    "updated_at=excluded.updated_at",
                    (seq, head, time.time()),
                )
        except sqlite3.Error as exc:
            raise StoreError(f"job store write failed: {exc}") from exc

    def forget(self) -> tuple[int, str] | None:
        """Delete the anchor (a person starting a new ledger on purpose); return it."""
        before = self.load()
        try:
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute("DELETE FROM audit_anchor")
        except sqlite3.Error as exc:
            raise StoreError(f"job store write failed: {exc}") from exc
        return before

    def close(self) -> None:
        self._db.close()


def read_audit_anchor(path: Path) -> tuple[int, str] | None:
    """The anchor in the store at ``path``, read-only (``audit --verify``).

    ``None`` when there is no store or no anchor in it: the command must not create a
    database. Raises :class:`StoreError` when the store exists but cannot be read.
    """
    if not path.exists():
        return None
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise StoreError(f"job store {path} cannot be opened: {exc}") from exc
    try:
        exists = db.execute(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name='audit_anchor'"
        ).fetchone()
        return _anchor_row(db) if exists else None
    except sqlite3.Error as exc:
        raise StoreError(f"job store {path} cannot be read: {exc}") from exc
    finally:
        db.close()


def read_history(
    path: Path, *, since: float | None = None, state: str | None = None
) -> list[JobRecord]:
    """Every job in the store at ``path``, read-only, oldest first (``jobs --all``).

    ``since``: only jobs not ended before then (still running, or ended at or after it);
    ``state``: only jobs in that state. Ended jobs stay at least :data:`REMEMBER_S`,
    or ``results.retention_h`` when longer (:meth:`JobStore.forget_old`).
    An empty list when there is no store (the command must not create one). Raises
    :class:`StoreError` when the store exists but cannot be read (``PermissionError``
    included: it is root's).
    """
    if not path.exists():
        return []
    # Fixed SQL, values bound: a NULL filter matches every row.
    sql = (
        "SELECT * FROM jobs WHERE (? IS NULL OR ended_at IS NULL OR ended_at >= ?) "
        "AND (? IS NULL OR state = ?) ORDER BY created_at, job_id"
    )
    args = (since, since, state, state)
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise StoreError(f"job store {path} cannot be opened: {exc}") from exc
    try:
        db.row_factory = sqlite3.Row
        rows = db.execute(sql, args).fetchall()
        return [_row(r) for r in rows]
    except sqlite3.Error as exc:
        raise StoreError(f"job store {path} cannot be read: {exc}") from exc
    finally:
        db.close()


def _anchor_row(db: sqlite3.Connection) -> tuple[int, str] | None:
    row = db.execute("SELECT seq, head FROM audit_anchor WHERE id = 1").fetchone()
    return None if row is None else (int(row[0]), str(row[1]))
