"""Held jobs and the decisions about them, in the job store's database (``jobs.db``).

Two tables of their own (created when missing: an existing store gains them at the
next start, the jobs table is untouched), so that a held job survives an agent restart
with the time it was held (its review deadline counts from then) and every approval or
refusal made so far. The ledger has the reviewers' words; this store has only what the
decision needs: who, which decision, when.

Writes commit with ``synchronous=FULL`` before the caller acts on them: an approval the
operator was told about survives a power cut. Used from the daemon's event loop only.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from agent.jobs.store import StoreError, _connect

Decision = Literal["release", "refuse"]
SCHEMA = """
CREATE TABLE IF NOT EXISTS review_holds (
    job_id     TEXT PRIMARY KEY,
    held_since REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS review_decisions (
    job_id   TEXT NOT NULL,
    reviewer TEXT NOT NULL,
    decision TEXT NOT NULL CHECK (decision IN ('release', 'refuse')),
    at       REAL NOT NULL,
    PRIMARY KEY (job_id, reviewer, decision)
);
"""


@dataclass(frozen=True)
class Vote:
    reviewer: str  # a uid as text, or "review_command"
    decision: Decision
    at: float


class ApprovalStore:
    """Open (and if needed extend) the store at ``path``. Raises :class:`StoreError`."""

    def __init__(self, path: Path) -> None:
        self._db = _connect(path, SCHEMA)

    def close(self) -> None:
        self._db.close()

    def _write(self, sql: str, args: tuple[object, ...]) -> int:
        try:
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                return self._db.execute(sql, args).rowcount
        except sqlite3.Error as exc:
            raise StoreError(f"job store write failed: {exc}") from exc

    def hold(self, job_id: str, now: float) -> float:
        """Record that ``job_id`` is held since ``now``, unless it already was; the time
        it has been held since (the earlier one after a restart)."""
        self._write(
            "INSERT OR IGNORE INTO review_holds (job_id, held_since) VALUES (?, ?)", (job_id, now)
        )
        since = self.held_since(job_id)
        assert since is not None
        return since

    def held_since(self, job_id: str) -> float | None:
        row = self._db.execute(
            "SELECT held_since FROM review_holds WHERE job_id=?", (job_id,)
        ).fetchone()
        return None if row is None else float(row[0])

    def vote(self, job_id: str, reviewer: str, decision: Decision, now: float) -> bool:
        """Record one reviewer's decision; False when that reviewer had already made it
        (the same uid releasing twice counts once)."""
        return (
            self._write(
                "INSERT OR IGNORE INTO review_decisions (job_id, reviewer, decision, at) "
                "VALUES (?, ?, ?, ?)",
                (job_id, reviewer, decision, now),
            )
            == 1
        )

    def votes(self, job_id: str) -> list[Vote]:
        rows = self._db.execute(
            "SELECT reviewer, decision, at FROM review_decisions WHERE job_id=? ORDER BY at",
            (job_id,),
        ).fetchall()
        return [Vote(str(r[0]), r[1], float(r[2])) for r in rows]

    def forget(self, job_id: str) -> None:
        """Drop the job's hold and decisions (it ended; the ledger keeps the story)."""
        try:
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute("DELETE FROM review_holds WHERE job_id=?", (job_id,))
                self._db.execute("DELETE FROM review_decisions WHERE job_id=?", (job_id,))
        except sqlite3.Error as exc:
            raise StoreError(f"job store write failed: {exc}") from exc

    def held_jobs(self) -> list[str]:
        """Every job with a recorded hold (for pruning)."""
        return [str(r[0]) for r in self._db.execute("SELECT job_id FROM review_holds")]
