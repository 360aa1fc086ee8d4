"""What every benchmark in bench/ reports, and the one place a goal is judged.

Each benchmark takes ``--json PATH`` and writes there (truncating it) one JSON object per
line, one line per metric, with exactly these fields:

- ``name``: ``<benchmark>.<metric>``, where ``<benchmark>`` is the file's stem
  (``job_start.overhead``); bench/run_all.py refuses a line named for another file.
- ``value``: the agent's figure, in ``unit``.
- ``baseline``: the same quantity for the baseline measured in the same run (raw docker
  SDK, raw asyncio TCP, a trivial process), in ``unit``.
- ``ratio``: ``value / baseline`` (``null`` when the baseline is 0).
- ``goal``: ``null`` for a figure shown for context, or ``"<subject> <op> <number>"``
  with subject ``value``, ``ratio`` or ``value-baseline`` and op one of ``< <= > >=``,
  the budget as docs/benchmarks.md lists it (``value-baseline <= 10``).
- ``unit``: of ``value`` and ``baseline`` (a ratio has none).

``--quick`` asks a benchmark for a short run (fewer runs, smaller sizes) whose figures
show that it works, not what the machine can do; the test of `make bench` uses it.
"""

from __future__ import annotations

import argparse
import json
import operator
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

FIELDS = ("name", "value", "baseline", "ratio", "goal", "unit")

_OPS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}


@dataclass(frozen=True)
class Metric:
    name: str
    value: float
    baseline: float
    ratio: float | None
    goal: str | None
    unit: str


def metric(name: str, value: float, baseline: float, goal: str | None, unit: str) -> Metric:
    """A metric with its ratio; ``goal`` must parse (a typo fails the benchmark at once,
    not after minutes of measuring)."""
    if goal is not None:
        _parse_goal(goal)
    ratio = value / baseline if baseline else None
    return Metric(name, value, baseline, ratio, goal, unit)


def add_report_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", type=Path, metavar="PATH", help="write JSON lines here")
    parser.add_argument("--quick", action="store_true", help="a short run (smaller, fewer)")


def write_json(path: Path | None, metrics: Iterable[Metric]) -> None:
    """Write ``metrics`` to ``path`` as JSON lines; nothing when ``path`` is None."""
    if path is None:
        return
    lines = [json.dumps(asdict(m), allow_nan=False) for m in metrics]
    path.write_text("".join(line + "\n" for line in lines))


def _parse_goal(goal: str) -> tuple[str, Callable[[float, float], bool], float]:
    parts = goal.split()
    if len(parts) != 3 or parts[0] not in ("value", "ratio", "value-baseline"):
        raise ValueError(f"goal {goal!r} is not '<value|ratio|value-baseline> <op> <number>'")
    if parts[1] not in _OPS:
        raise ValueError(f"goal {goal!r}: the operator must be one of {' '.join(_OPS)}")
    return parts[0], _OPS[parts[1]], float(parts[2])


def goal_met(record: Mapping[str, Any]) -> bool | None:
    """Whether a JSON line's figures meet its goal; None when it has no goal.

    Raises ValueError for a goal that does not parse.
    """
    goal = record.get("goal")
    if goal is None:
        return None
    subject, op, bound = _parse_goal(str(goal))
    value, baseline, ratio = record["value"], record["baseline"], record["ratio"]
    figure = {"value": value, "ratio": ratio, "value-baseline": value - baseline}[subject]
    return figure is not None and op(float(figure), bound)
