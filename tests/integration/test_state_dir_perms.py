"""Item 9 of the hostile review: a state directory the agent did not make private.

Run without systemd (no ``StateDirectoryMode=``/``UMask=``) on a state directory that
already existed with mode 0755, the agent left it so, and SQLite created ``jobs.db-wal``
with the mode of an old 0644 ``jobs.db``: any local user could read a job's ``env``,
provider secrets included. The agent must make the directory 0700 and its files
owner-only, whatever umask it was started with, or refuse to start.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.helpers.env import seconds, valid_config, write_config
from tests.helpers.proc import agent_command, running_agent

# What the agent keeps directly in its state directory once its job store is open.
STORE_FILES = ("jobs.db", "jobs.db-wal", "jobs.db-shm", "audit.jsonl")


@contextmanager
def loose_umask() -> Iterator[None]:
    """Start children with umask 022, as a shell usually does (the child inherits it)."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.mark.parametrize("existing", [True, False], ids=["existing-0755-dir", "new-dir"])
def test_state_dir_and_store_files_are_owner_only(tmp_path: Path, existing: bool) -> None:
    """Attack (hostile review, item 9): a local user reads jobs.db-wal (a job's env with
    a provider's secret) from a state directory left 0755, whose files an agent started
    from a shell (umask 022) created 0644, or kept at the mode of an old 0644 jobs.db."""
    config = valid_config(tmp_path, control_plane=False)
    state = Path(config["state_dir"])
    if existing:
        state.mkdir(mode=0o755)
        state.chmod(0o755)
        # Left by an earlier agent run under umask 022: SQLite gives a new -wal file
        # the mode of the database, whatever the umask.
        sqlite3.connect(state / "jobs.db").close()
        (state / "jobs.db").chmod(0o644)
    port = int(config["health"]["listen"].rsplit(":", 1)[1])
    path = write_config(tmp_path, config)
    with loose_umask(), running_agent(path, port, tmp_path) as agent:
        deadline = time.monotonic() + seconds(20)
        while not all((state / name).exists() for name in STORE_FILES):
            assert time.monotonic() < deadline, sorted(p.name for p in state.iterdir())
            time.sleep(seconds(0.05))
        assert _mode(state) == 0o700
        loose = {
            p.name: f"{_mode(p):04o}" for p in state.iterdir() if p.is_file() and _mode(p) & 0o077
        }
        assert loose == {}, "group or others can read these"
        assert agent.get("/healthz")[0] == 200
        assert agent.stop()[0] == 0


def test_a_state_dir_owned_by_another_user_refuses_start(tmp_path: Path) -> None:
    """Attack (hostile review, item 9): state_dir points at a directory another local
    user owns; that user can chmod it open at any time and read the job store, so the
    agent must refuse to start, naming the directory, and leave it untouched."""
    if os.geteuid() != 0:
        pytest.skip("making a directory that another user owns needs root")
    config = valid_config(tmp_path, control_plane=False)
    state = Path(config["state_dir"])
    state.mkdir(mode=0o755)
    state.chmod(0o755)
    os.chown(state, 65534, 65534)
    path = write_config(tmp_path, config)
    proc = subprocess.run(
        [*agent_command(), "run", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=seconds(20),  # a refusal is immediate; this bounds a regression
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    assert proc.returncode == 78, proc.stderr
    assert f"state directory {state} is owned by uid 65534" in proc.stderr
    assert _mode(state) == 0o755
    assert list(state.iterdir()) == []  # no store, no ledger written into it
