"""The ledger's line format and the chain check: pure functions over bytes and files.

One entry is one line: canonical JSON (keys sorted, no spaces, ASCII only) followed by
``\\n``. Every entry carries ``seq`` (1, 2, 3, … with no gap) and ``prev``, the sha256
hex digest of the previous line's exact bytes, newline included. The first entry's
``prev`` is :data:`GENESIS`, the sha256 of no bytes at all.

Only this module decides what a well-formed ledger is; the writer
(:mod:`agent.audit.ledger`) produces lines with :func:`encode` and the CLI checks them
with :func:`verify`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.errors import AgentError

# sha256(b""): the "previous line" of the first entry is the empty string.
GENESIS = hashlib.sha256(b"").hexdigest()
# Keys every entry has, set by the writer; fields passed by callers may not use them.
RESERVED = frozenset({"seq", "ts", "kind", "job_id", "prev"})


class AuditError(AgentError):
    """The ledger cannot be written or read as a ledger.

    Raised when an entry cannot be made durable (disk full, I/O error: nothing of it is
    left in the file), when another process holds the ledger, when its last entry is
    unreadable so the chain cannot be continued, or when :func:`read` meets a line that
    is not an entry. A broken chain is not an exception: :func:`verify` reports it.
    """


# One encoder, not json.dumps with options (which builds one per call): 10,000 result
# files are 10,000 entries.
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), allow_nan=False)


def encode(entry: Mapping[str, Any]) -> bytes:
    """The canonical line for ``entry``, newline included.

    Raises ``ValueError`` for values JSON cannot hold exactly (NaN, infinity) and
    ``TypeError`` for values it cannot hold at all.
    """
    return _ENCODER.encode(entry).encode("ascii") + b"\n"


def line_hash(line: bytes) -> str:
    """The sha256 hex digest of ``line``'s exact bytes: the next entry's ``prev``."""
    return hashlib.sha256(line).hexdigest()


def parse(line: bytes) -> dict[str, Any] | None:
    """The entry on ``line``, or ``None`` when the line is not a well-formed entry."""
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    if not isinstance(entry, dict):
        return None
    seq, prev = entry.get("seq"), entry.get("prev")
    if type(seq) is not int or not isinstance(prev, str) or not isinstance(entry.get("kind"), str):
        return None
    return entry


@dataclass(frozen=True)
class VerifyResult:
    """What :func:`verify` found.

    ``entries`` counts the lines checked before the first problem (all of them when
    ``ok``). ``first_bad_line`` is 1-based: the first line that does not chain to the
    one before it, or is not an entry at all.
    """

    ok: bool
    entries: int
    first_bad_line: int | None = None
    problem: str | None = None
    head: str | None = None  # sha256 of the last line when ok: compare with the one shipped off-box


def verify(path: Path, anchor: tuple[int, str] | None = None) -> VerifyResult:
    """Check the whole chain in ``path``, streaming it (memory does not grow with it).

    Detects a changed byte (the line no longer parses, or the next line's ``prev`` no
    longer matches it), a removed, inserted or reordered line (``seq`` out of order,
    ``prev`` mismatch), and a torn or truncated last line (no newline). On its own it
    cannot see lines cut off the end at a line boundary, a deleted ledger, nor a chain
    rewritten from scratch: with ``anchor``, the ``(seq, head)`` the job store kept
    (:mod:`agent.audit.anchor`), a ledger with fewer entries, or another entry at that
    ``seq``, fails too, and so does a missing file. The head shipped off-box
    (docs/audit.md) covers a store lost with the ledger.

    Raises ``OSError`` when the file cannot be opened or read (``FileNotFoundError``
    when there is no ledger and no anchor says there should be one).
    """
    prev, count, at = GENESIS, 0, None
    try:
        f = path.open("rb")
    except FileNotFoundError:
        if anchor is None or anchor[0] == 0:
            raise
        return VerifyResult(False, 0, 1, anchor_problem(anchor, 0, GENESIS, None))
    with f:
        for number, line in enumerate(f, start=1):
            problem = _check(line, number, prev)
            if problem is not None:
                return VerifyResult(False, count, number, problem)
            prev, count = line_hash(line), number
            if anchor is not None and number == anchor[0]:
                at = prev
    if anchor is not None and (problem := anchor_problem(anchor, count, prev, at)) is not None:
        first_bad = min(count + 1, anchor[0])
        return VerifyResult(False, first_bad - 1, first_bad, problem)
    return VerifyResult(True, count, head=prev if count else None)


def anchor_problem(anchored: tuple[int, str], seq: int, head: str, at: str | None) -> str | None:
    """Why a ledger whose last entry is ``(seq, head)`` does not match ``anchored``, or
    ``None`` when it does. ``at`` is the hash of the ledger's entry number
    ``anchored[0]`` when the ledger has that many (``None`` otherwise)."""
    a_seq, a_head = anchored
    if a_seq == 0:
        return None if a_head == GENESIS else "the job store's anchor is not a ledger head"
    if seq < a_seq:
        where = "is missing or empty" if seq == 0 else f"ends at entry {seq}"
        return (
            f"the ledger {where}, but the job store's anchor records {a_seq} entries "
            f"(head {a_head}): the ledger was deleted, cut short or replaced"
        )
    if (head if seq == a_seq else at) != a_head:
        return (
            f"entry {a_seq} is not the one the job store's anchor records (head {a_head}): "
            "the ledger was rewritten or replaced"
        )
    return None


def _check(line: bytes, number: int, prev: str) -> str | None:
    if not line.endswith(b"\n"):
        return "the last line is incomplete (no newline): a torn write or a truncated file"
    entry = parse(line)
    if entry is None:
        return "not a ledger entry (unparsable JSON, or no seq, kind or prev): the line was changed"
    if encode(entry) != line:
        return "not in canonical form: the line was changed"
    if entry["seq"] != number:
        return (
            f"seq is {entry['seq']} where {number} was expected: "
            "a line was removed, inserted or moved before it"
        )
    if entry["prev"] != prev:
        if number == 1:
            return "prev is not the genesis value: the line was changed"
        return (
            f"prev does not match the sha256 of line {number - 1}: that line or this one "
            "was changed, or lines were removed or inserted between them"
        )
    return None


def read(path: Path, job_id: str | None = None) -> Iterator[dict[str, Any]]:
    """Yield the entries of ``path`` in order; only ``job_id``'s when it is given.

    Does not check the chain (use :func:`verify`). An incomplete last line is a write
    that never finished; it is not an entry and is skipped. Raises :class:`AuditError`
    naming the line when a complete line is not an entry, and ``OSError`` when the
    file cannot be read.
    """
    with path.open("rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.endswith(b"\n"):
                return
            entry = parse(line)
            if entry is None:
                raise AuditError(f"audit ledger {path}: line {number} is not a ledger entry")
            if job_id is None or entry.get("job_id") == job_id:
                yield entry
