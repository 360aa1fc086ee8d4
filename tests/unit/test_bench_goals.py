"""How `make bench` judges a figure against its goal (bench/_report.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench._report import FIELDS, goal_met, metric, write_json


def judged(value: float, baseline: float, goal: str | None, tmp_path: Path) -> bool | None:
    """The verdict the runner reaches for one figure, through the --json line it reads."""
    out = tmp_path / "one.jsonl"
    write_json(out, [metric("b.m", value, baseline, goal, "u")])
    return goal_met(json.loads(out.read_text()))


def test_job_start_goal_is_judged_on_the_overhead_not_the_value(tmp_path: Path) -> None:
    """A start 11 ms slower than raw docker must read NO, though 175 ms alone is under
    any bound on the value: judging the wrong quantity reports a missed budget as met."""
    assert judged(175.0, 164.0, "value-baseline <= 10", tmp_path) is False
    assert judged(170.0, 164.0, "value-baseline <= 10", tmp_path) is True


def test_streaming_goal_is_judged_on_the_ratio_and_rss_on_the_value(tmp_path: Path) -> None:
    """0.12 of raw TCP must read NO against >= 0.5, and 4 MiB of growth YES against < 32,
    whatever the absolute throughput or the RSS the agent started from."""
    assert judged(174.0, 1452.0, "ratio >= 0.5", tmp_path) is False
    assert judged(800.0, 1452.0, "ratio >= 0.5", tmp_path) is True
    assert judged(4.0, 53.0, "value < 32", tmp_path) is True
    assert judged(32.0, 53.0, "value < 32", tmp_path) is False


def test_a_figure_without_a_goal_is_neither_met_nor_unmet(tmp_path: Path) -> None:
    """A context figure (end-to-end throughput) must count as neither a pass nor a miss."""
    assert judged(97.0, 1280.0, None, tmp_path) is None


def test_a_malformed_goal_fails_the_benchmark_before_it_measures() -> None:
    """A typo in a goal would otherwise show a budget as unmet (or met) on every run."""
    with pytest.raises(ValueError, match="operator"):
        metric("i.r", 50.0, 20.0, "value =< 48", "MiB")
    with pytest.raises(ValueError, match="rss"):
        metric("i.r", 50.0, 20.0, "rss <= 48", "MiB")


def test_json_lines_have_exactly_the_six_fields(tmp_path: Path) -> None:
    """Readers of --json (CI, trend graphs) get these six fields and valid JSON: a zero
    baseline gives a null ratio, never NaN, which strict JSON parsers reject."""
    out = tmp_path / "b.jsonl"
    write_json(
        out, [metric("i.r", 50.0, 0.0, "value <= 48", "MiB"), metric("i.c", 1, 2, None, "%")]
    )
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [set(r) for r in records] == [set(FIELDS)] * 2
    assert set(FIELDS) == {"name", "value", "baseline", "ratio", "goal", "unit"}
    assert records[0]["ratio"] is None
    assert "NaN" not in out.read_text()
