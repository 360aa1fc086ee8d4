"""Issue 12: the lines cli.py itself prints reach the journal at their priority."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.helpers.env import seconds
from tests.helpers.proc import REPO, agent_command


def _run_bad_config(tmp_path: Path, *, journal: bool) -> tuple[int, list[str]]:
    config = tmp_path / "bad.yaml"
    config.write_text("limits: {pids: 0, max_cpus: 0}\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("JOURNAL_STREAM", None)
    log = tmp_path / "stderr.log"
    with log.open("wb") as stderr:
        if journal:  # what systemd sets when stderr is its journal socket
            st = os.fstat(stderr.fileno())
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        proc = subprocess.run(
            [*agent_command(), "run", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=env,
            timeout=seconds(60),
            check=False,
        )
    return proc.returncode, log.read_text().splitlines()


def test_exit_78_config_errors_reach_the_journal_as_errors(tmp_path: Path) -> None:
    """Attack: a bad config makes the service exit 78, and `journalctl -p err -u
    cloudbender-agent` shows nothing: cli.py's lines went to the journal at priority 6."""
    code, lines = _run_bad_config(tmp_path, journal=True)
    assert code == 78
    assert len(lines) >= 3, lines  # the heading and one line per problem
    assert all(line.startswith("<3>") for line in lines), lines
    assert any("limits.pids" in line for line in lines)


def test_outside_the_journal_the_lines_stay_plain(tmp_path: Path) -> None:
    """Attack: a prefix on a terminal or in a redirected file is noise a person reads."""
    code, lines = _run_bad_config(tmp_path, journal=False)
    assert code == 78
    assert lines and not any(line.startswith("<") for line in lines), lines
