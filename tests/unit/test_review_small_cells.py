"""examples/review/small_cells.py, the shipped review program, run as a real process.

Its contract (the program's docstring): the manifest on stdin, the files relative to
the working directory, exit 0 approve / 1 refuse with one line / 2 its own error.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).parents[2] / "examples" / "review" / "small_cells.py"


def run(
    tmp_path: Path, tables: dict[str, str], *args: str, stdin: str | None = None
) -> tuple[int, str]:
    for name, text in tables.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    manifest = {
        "files": [{"index": i, "path": p, "size": 0, "sha256": ""} for i, p in enumerate(tables)]
    }
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), *args],
        input=json.dumps(manifest) if stdin is None else stdin,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    return done.returncode, done.stdout.strip()


def test_a_small_cell_refuses_with_one_line_naming_file_row_and_value(tmp_path: Path) -> None:
    """A table counting 3 patients in one region lets a reader single them out."""
    code, out = run(
        tmp_path, {"notes.txt": "count 1", "t/by_region.csv": "region,count\nn,12\ns,3\n"}
    )
    assert (code, out) == (1, "small cell: t/by_region.csv row 3: count=3 is below 10")


def test_clean_tables_and_suppressed_cells_approve(tmp_path: Path) -> None:
    """Counts at the threshold and blank (suppressed) cells must pass, or nothing ever would."""
    tables = {"a.csv": "region,count\nn,10\ns,\n", "b.CSV": "x,y\n1,2\n", "c.txt": "count,1\n"}
    assert run(tmp_path, tables) == (0, "")


@pytest.mark.parametrize(("args", "expected"), [(("--min", "5"), 0), (("--column", "n"), 1)])
def test_column_and_threshold_are_configurable(
    tmp_path: Path, args: tuple[str, str], expected: int
) -> None:
    """A consumer whose tables call the column ``n`` or use another threshold."""
    assert run(tmp_path, {"a.csv": "count,n\n7,2\n"}, *args)[0] == expected


def test_a_value_that_is_not_a_count_refuses(tmp_path: Path) -> None:
    """'<5' or '1e0' hides a small cell from a check that only compares integers."""
    assert run(tmp_path, {"a.csv": "region,count\nn,<5\n"})[0] == 1


def test_its_own_errors_exit_2_and_leave_the_decision_to_a_person(tmp_path: Path) -> None:
    """A garbled manifest must not approve (0) nor read as a refusal reason (1)."""
    assert run(tmp_path, {}, stdin="not json")[0] == 2
