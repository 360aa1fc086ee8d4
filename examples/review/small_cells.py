#!/usr/bin/env python3
"""Refuse results that hold a small cell: a review program for ``results.review_command``.

The small-cell rule of statistical disclosure control: a table that counts people
must not show a count below a threshold (commonly 10), or a reader may single
someone out.

Contract (as cloudbender-agent runs it, docs/review-command.md):

- stdin: the ``result.manifest`` as JSON: ``{"files": [{"index", "path", "size",
  "sha256"}, ...], ...}``.
- The files are read-only, at their manifest paths relative to the working directory
  (or to ``--dir DIR``).
- Every file whose path ends in ``.csv`` (any case) is read as CSV with a header row.
  A file without the count column is not checked. Each value of the column must be
  an integer; a value below ``--min`` (or not an integer) refuses. An empty cell is
  a suppressed cell and passes. Other files are not checked.
- Exit 0: every checked cell is at least ``--min`` (approve). Exit 1: one line on
  stdout saying which file, row and value broke the rule (refuse). Exit 2: this
  program's own error (bad stdin, unreadable file); the agent leaves the job held
  for a person.

Usage: ``python3 small_cells.py [--column count] [--min 10] [--dir .]``. Stdlib only.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path


def check_csv(path: Path, shown: str, column: str, minimum: int) -> str | None:
    """The reason ``path`` breaks the rule, or None. ``shown`` is its manifest path."""
    with path.open(newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or column not in reader.fieldnames:
            return None
        for row_number, row in enumerate(reader, start=2):
            value = (row.get(column) or "").strip()
            if value == "":
                continue
            try:
                count = int(value)
            except ValueError:
                return f"{shown} row {row_number}: {column}={value!r} is not a count"
            if count < minimum:
                return f"{shown} row {row_number}: {column}={count} is below {minimum}"
    return None


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--column", default="count", help="the count column (default: count)")
    parser.add_argument("--min", type=int, default=10, help="smallest count allowed (default: 10)")
    parser.add_argument("--dir", type=Path, default=Path("."), help="where the files are")
    args = parser.parse_args(argv)
    try:
        manifest = json.load(sys.stdin)
        paths = [str(f["path"]) for f in manifest["files"]]
    except (ValueError, KeyError, TypeError) as exc:
        print(f"small_cells: the manifest on stdin is not usable: {exc}", file=sys.stderr)
        return 2
    for shown in paths:
        if not shown.lower().endswith(".csv"):
            continue
        try:
            reason = check_csv(args.dir / shown, shown, args.column, args.min)
        except (OSError, csv.Error) as exc:
            print(f"small_cells: cannot read {shown}: {exc}", file=sys.stderr)
            return 2
        if reason:
            print(f"small cell: {reason}")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
