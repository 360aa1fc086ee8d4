"""A safe look at spooled result files, for ``review show`` (pure apart from reading).

Whatever a job wrote is shown so that nothing in it can act on the reviewer's
terminal: every name and line goes through :func:`agent.escaping.escape` (control
characters, escape sequences, bidi overrides made visible), lines are cut at
:data:`MAX_LINE` characters and at most :data:`MAX_LINES` lines are shown. A file that
is not UTF-8 text (a NUL byte, or bytes that do not decode) is described (its size and
hash, in the manifest), never printed. For CSV (by name, ``.csv``/``.tsv``), the row
count and the column names are given too, so that a reviewer sees the table's shape
without reading all of it.

Reads come from the spool (the verified copy that would be sent), never from the job's
output, and at most :data:`MAX_READ` bytes of a file are read for a preview; the row
count reads the whole file in blocks.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from agent.escaping import escape
from agent.results.scan import ResultFile
from agent.results.spool import Manifest, Spool

MAX_LINES = 10
MAX_LINE = 200
MAX_READ = 64 * 1024
BLOCK = 1024 * 1024


@dataclass(frozen=True)
class Preview:
    kind: str  # "text", "csv", "binary", "empty" or "unreadable"
    lines: tuple[str, ...] = ()  # escaped and cut: safe to print
    rows: int | None = None  # CSV: data rows (the header excluded)
    columns: tuple[str, ...] = ()  # CSV: escaped column names


def _chunks(spool: Spool, manifest: Manifest, f: ResultFile, limit: int) -> Iterator[bytes]:
    """Up to ``limit`` bytes of file ``f`` from the spool (packed or one file each)."""
    data = spool.data_path(manifest.job_id)
    if data.exists():
        path, start = data, manifest.offsets[f.index]
    else:
        path, start = spool.legacy_file_path(manifest.job_id, f.index), 0
    left = min(limit, f.size)
    with path.open("rb") as fh:
        fh.seek(start)
        while left > 0:
            chunk = fh.read(min(BLOCK, left))
            if not chunk:
                return
            left -= len(chunk)
            yield chunk


def cut(line: str, width: int = MAX_LINE) -> str:
    """``line`` escaped, and cut to ``width`` characters with a mark saying so."""
    shown = escape(line)
    if len(shown) <= width:
        return shown
    return f"{shown[:width]}… ({len(shown) - width} more characters)"


def preview(spool: Spool, manifest: Manifest, f: ResultFile) -> Preview:
    """What ``review show`` prints of file ``f``. Never raises for the file's content;
    an I/O error gives kind ``unreadable``."""
    if f.size == 0:
        return Preview("empty")
    try:
        head = b"".join(_chunks(spool, manifest, f, MAX_READ))
    except OSError:
        return Preview("unreadable")
    text = _decode(head, whole=f.size <= MAX_READ)
    if text is None:
        return Preview("binary")
    lines = text.splitlines()[:MAX_LINES]
    shown = tuple(cut(line) for line in lines)
    if Path(f.path).suffix.lower() not in (".csv", ".tsv"):
        return Preview("text", shown)
    delimiter = "\t" if f.path.lower().endswith(".tsv") else ","
    header = next(csv.reader(io.StringIO(lines[0] if lines else ""), delimiter=delimiter), [])
    try:
        rows = _count_rows(spool, manifest, f)
    except OSError:
        rows = None
    return Preview("csv", shown, rows, tuple(cut(c, 60) for c in header))


def _decode(data: bytes, *, whole: bool) -> str | None:
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        # A prefix may end inside a character: only the last 3 bytes may be cut short.
        if not whole and exc.start >= len(data) - 3:
            return data[: exc.start].decode("utf-8")
        return None


def _count_rows(spool: Spool, manifest: Manifest, f: ResultFile) -> int:
    """Lines after the header (a final line without a newline counts; quoted newlines
    inside a field are counted as lines: this is a reviewer's estimate, said so)."""
    newlines, last = 0, b"\n"
    for chunk in _chunks(spool, manifest, f, f.size):
        newlines += chunk.count(b"\n")
        last = chunk[-1:]
    lines = newlines + (0 if last == b"\n" else 1)
    return max(0, lines - 1)
