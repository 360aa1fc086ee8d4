"""Run every benchmark in bench/ and print one table of their figures against goals.

Each benchmark runs as its own process, one after another (running them side by side
would make each one measure the others), with ``--json`` into a temporary file; its own
human output passes through as it runs. Then one table: metric, value, the baseline
measured in the same run, their ratio, the goal (docs/benchmarks.md) and
whether it was met.

A benchmark is every ``bench/*.py`` except helpers (a leading ``_``), this runner and
``soak.py``: a new file is picked up without editing a list here.

Exit status: 0 when every benchmark ran and reported; 1 when one failed, wrote no
figures or wrote a malformed line (its row says which); with ``--strict``, 1 also when
a goal was not met. Unmet goals are reported, not fatal by default: the figures depend
on the machine, and the table is how a person sees where the agent stands.

Run: ``make bench`` or ``.venv/bin/python bench/run_all.py [--quick] [--json PATH]
[--only NAME ...] [--strict]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._report import FIELDS, goal_met

BENCH = Path(__file__).resolve().parent
NOT_BENCHMARKS = {
    "run_all": "this runner",
    "soak": "a fault-injection run with a pass/fail verdict, not a measurement (`make soak`)",
}


def benchmarks() -> list[Path]:
    return sorted(
        path
        for path in BENCH.glob("*.py")
        if not path.name.startswith("_") and path.stem not in NOT_BENCHMARKS
    )


def run_one(path: Path, quick: bool, out: Path) -> tuple[list[dict[str, Any]], str | None]:
    """Run one benchmark; its records, and why it failed (None when it did not)."""
    cmd = [sys.executable, str(path), "--json", str(out), *(["--quick"] if quick else [])]
    print(f"== {path.name}: {' '.join(cmd[1:])}", flush=True)
    started = time.monotonic()
    code = subprocess.run(cmd, check=False).returncode
    print(f"== {path.name}: exit {code} after {time.monotonic() - started:.0f} s", flush=True)
    if code != 0:
        return [], f"exit status {code}"
    if not out.exists():
        return [], "wrote no --json file"
    records: list[dict[str, Any]] = []
    for number, line in enumerate(out.read_text().splitlines(), 1):
        try:
            record = json.loads(line)
            missing = [f for f in FIELDS if f not in record]
            if missing:
                return records, f"line {number} lacks {', '.join(missing)}"
            if not str(record["name"]).startswith(f"{path.stem}."):
                return records, f"line {number} is named {record['name']!r}, not {path.stem}.*"
            goal_met(record)  # a goal that does not parse is the benchmark's bug
        except ValueError as exc:
            return records, f"line {number}: {exc}"
        records.append(record)
    return records, None if records else "wrote no figures"


def number(x: Any) -> str:
    if x is None:
        return "-"
    x = float(x)
    return f"{x:.0f}" if abs(x) >= 1000 else f"{x:#.3g}" if abs(x) < 10 else f"{x:.1f}"


def table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs: shows it works")
    parser.add_argument("--json", type=Path, metavar="PATH", help="all JSON lines, here too")
    parser.add_argument("--only", action="append", metavar="NAME", help="a benchmark's stem")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a goal is unmet")
    args = parser.parse_args()
    paths = [p for p in benchmarks() if not args.only or p.stem in args.only]
    if not paths:
        parser.error(f"no benchmark named {args.only}; there are {[p.stem for p in benchmarks()]}")
    rows = [["metric", "value", "baseline", "ratio", "goal", "met"]]
    all_records: list[dict[str, Any]] = []
    failed = unmet = False
    with tempfile.TemporaryDirectory(prefix="cloudbender-bench-") as tmp:
        for path in paths:
            records, error = run_one(path, args.quick, Path(tmp) / f"{path.stem}.jsonl")
            for r in records:
                met = goal_met(r)
                unmet = unmet or met is False
                unit = f" {r['unit']}" if r["unit"] else ""
                rows.append(
                    [
                        r["name"],
                        number(r["value"]) + unit,
                        number(r["baseline"]) + unit,
                        number(r["ratio"]),
                        r["goal"] or "-",
                        {True: "yes", False: "NO", None: "-"}[met],
                    ]
                )
            all_records.extend(records)
            if error is not None:
                failed = True
                rows.append([path.stem, "FAILED", "-", "-", "-", error])
    if args.json is not None:
        args.json.write_text("".join(json.dumps(r) + "\n" for r in all_records))
    mode = (
        "quick runs: these figures show it works, not what this machine can do"
        if args.quick
        else "full runs"
    )
    print(f"\nbenchmarks ({mode}); baseline: measured in the same run; ratio = value / baseline")
    print(table(rows))
    return 1 if failed or (args.strict and unmet) else 0


if __name__ == "__main__":
    sys.exit(main())
