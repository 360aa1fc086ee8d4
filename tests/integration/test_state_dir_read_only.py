"""Issue 12, the unit under a real systemd: a state directory the agent cannot write.

Under ``ProtectSystem=strict`` only ``/var/lib/cloudbender-agent`` (``StateDirectory=``)
is writable. A ``state_dir`` elsewhere without ``ReadWritePaths=`` was reported as a
health problem that starves the watchdog: systemd killed and restarted the agent every
``WatchdogSec``, forever, and nothing said how to fix it. The agent must exit 78
(``RestartPreventExitStatus=``) naming the directory and the fix. A read-only bind mount
is what systemd does to the path; ``chattr +i`` is the same refusal without a mount.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.helpers.env import seconds, valid_config, write_config
from tests.helpers.proc import agent_command

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mount and chattr need root")


def _sh(*argv: str) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=seconds(20))
    if result.returncode != 0:
        pytest.skip(f"{' '.join(argv)}: {result.stderr.strip()} (no privilege for it here)")


@contextmanager
def read_only(path: Path, how: str) -> Iterator[None]:
    """Make ``path`` read-only the way ``how`` says, and undo it afterwards."""
    if how == "mount":
        _sh("mount", "--bind", str(path), str(path))
        try:
            _sh("mount", "-o", "remount,bind,ro", str(path))
            yield
        finally:
            subprocess.run(["umount", str(path)], check=True, timeout=seconds(20))
    else:
        _sh("chattr", "+i", str(path))
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(path)], check=True, timeout=seconds(20))


def _run_agent(config_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*agent_command(), "run", "--config", str(config_path)],
        capture_output=True,
        text=True,
        timeout=seconds(30),  # a refusal is immediate; this bounds a regression
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )


@pytest.mark.parametrize(
    ("how", "existing"),
    [("mount", True), ("mount", False), ("chattr", True)],
    ids=["existing-dir-read-only-mount", "new-dir-under-read-only-mount", "immutable-dir"],
)
def test_read_only_state_dir_exits_78_with_the_fix(
    tmp_path: Path, how: str, existing: bool
) -> None:
    """Attack (issue 12): state_dir outside /var/lib under ProtectSystem=strict with no
    ReadWritePaths=; the agent took it for a passing fault, starved the watchdog and
    was restarted every 30 s without end, the journal never saying what to change."""
    config = valid_config(tmp_path, control_plane=False)
    srv = tmp_path / "srv"
    srv.mkdir(mode=0o700)
    state = srv / "cloudbender"
    if existing:
        state.mkdir(mode=0o700)
    config["state_dir"] = str(state)
    path = write_config(tmp_path, config)
    # What systemd makes read-only: the existing directory, or where it would be made.
    with read_only(state if existing else srv, how):
        proc = _run_agent(path)
    assert proc.returncode == 78, proc.stderr
    assert f"state directory {state} is read-only to the agent; under systemd" in proc.stderr
    assert f"add ReadWritePaths={state} to the unit" in proc.stderr
    assert "/var/lib/cloudbender-agent" in proc.stderr
