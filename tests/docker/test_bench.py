"""`make bench` (bench/run_all.py), in its quick mode, against the real engine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import docker
import pytest

from tests.helpers.env import seconds

pytestmark = pytest.mark.docker
BENCH = Path(__file__).resolve().parents[2] / "bench"
# Not benchmarks: the runner itself and the soak (a fault-injection run, `make soak`).
NOT_BENCHMARKS = {"run_all", "soak"}
FIELDS = {"name", "value", "baseline", "ratio", "goal", "unit"}


def benchmark_stems() -> set[str]:
    return {
        path.stem
        for path in BENCH.glob("*.py")
        if not path.name.startswith("_") and path.stem not in NOT_BENCHMARKS
    }


@pytest.mark.timeout(seconds(180))
def test_make_bench_prints_a_row_for_every_benchmark_and_json_lines_carry_six_fields(
    docker_client: docker.DockerClient, test_image: str, tmp_path: Path
) -> None:
    """A benchmark file in bench/ that the table leaves out, that crashes, or whose
    --json lines lack a field would leave a performance budget unreported while `make
    bench` looks complete to the person reading it."""
    out = tmp_path / "all.jsonl"
    done = subprocess.run(
        [sys.executable, str(BENCH / "run_all.py"), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=seconds(170),
        check=False,
    )
    text = done.stdout + done.stderr
    assert done.returncode == 0, text[-4000:]
    table = done.stdout.split("\nbenchmarks (", 1)[1].splitlines()[1:]
    assert table[0].split() == ["metric", "value", "baseline", "ratio", "goal", "met"]
    names = [line.split()[0] for line in table[2:] if line.strip()]
    stems = benchmark_stems()
    assert {"idle", "job_start", "result_streaming"} <= stems
    for stem in stems:
        assert any(name.startswith(f"{stem}.") for name in names), (stem, table)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["name"] for r in records] == names
    for record in records:
        assert set(record) == FIELDS, record
        assert isinstance(record["value"], float | int), record
        assert isinstance(record["baseline"], float | int), record
