"""The ledger's anchor: its entry count and head hash, kept outside the ledger file.

A chain only proves that each line follows the one before it. A ledger that was
deleted (and recreated empty), cut off at a line boundary, or replaced by an older copy
is still a valid chain; compared with the anchor it is not. The writer saves the anchor
after every durable append (:class:`agent.audit.AuditLedger`), checks it when it opens
the file, and ``audit --verify`` checks it too (:func:`agent.audit.verify`).

The anchor may lag the file by the entries of one append (a crash between the fsync of
the file and the commit of the anchor), never lead it: the file is written first.
So "the file has fewer entries than the anchor", or "the file's entry at the anchor's
``seq`` is not the anchor's ``head``", is a lost or rewritten ledger, never a crash.
"""

from __future__ import annotations

import os
from typing import Protocol

from agent.audit.chain import line_hash, parse

_CHUNK = 64 * 1024


class Anchor(Protocol):
    """Where the anchor is kept (the job store: :class:`agent.jobs.store.AuditAnchor`).

    Each method raises :class:`agent.errors.AgentError` when the store cannot do it.
    """

    def load(self) -> tuple[int, str] | None:
        """``(seq, head)`` as last saved, ``None`` when never saved."""
        ...

    def save(self, seq: int, head: str) -> None:
        """Record the ledger's head; durable (fsynced) when it returns."""
        ...

    def close(self) -> None: ...


def hash_of_entry(fd: int, size: int, seq: int, want: int) -> str | None:
    """The sha256 of entry ``want`` of the ledger open on ``fd`` (``size`` bytes, whose
    last complete line is entry ``seq``), read backwards from the end: the anchor lags
    by one append at most, so this reads a few lines, not the file. ``None`` when that
    line is not entry ``want``."""
    end = size
    for _ in range(seq - want):
        end = last_newline(fd, end - 1) + 1
        if end <= 0:
            return None
    start = last_newline(fd, end - 1) + 1
    line = os.pread(fd, end - start, start)
    entry = parse(line)
    if entry is None or entry["seq"] != want:
        return None
    return line_hash(line)


def last_newline(fd: int, end: int) -> int:
    """The offset of the last ``\\n`` before ``end``, or -1. Reads backwards in chunks."""
    while end > 0:
        start = max(0, end - _CHUNK)
        at = os.pread(fd, end - start, start).rfind(b"\n")
        if at >= 0:
            return start + at
        end = start
    return -1
