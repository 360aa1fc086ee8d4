"""Job outputs under the hardened unit are mounted by PID 1 through ``systemd-mount``
(agent/jobs/outputfs.py, :class:`SystemdMounter`). This machine has no systemd as PID 1,
so a stand-in ``systemd-mount`` on ``PATH`` behaves as systemd-mount(1) says: the mount
is a job of PID 1's queue, which the command waits for by default and, with
``--no-block``, does not (here: the job has not run when the command returns). The
mount itself is real: the job's ext4 image on a loop device."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from agent.jobs.outputfs import OutputVolumes, SystemdMounter

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")

MOUNT = """\
import subprocess, sys
args = sys.argv[1:]
options = next((a.split("=", 1)[1] for a in args if a.startswith("--options=")), "")
what, where = [a for a in args if not a.startswith("--")]
if "--no-block" in args:
    sys.exit(0)  # queued; PID 1 has not mounted it yet
mount = ["mount", "-t", "ext4", "-o", "loop," + options, what, where]
sys.exit(subprocess.run(mount, check=False).returncode)
"""
UMOUNT = """\
import subprocess, sys
sys.exit(subprocess.run(["umount", sys.argv[-1]], check=False).returncode)
"""


def test_a_job_output_mounted_through_systemd_is_mounted_when_make_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mount still queued in PID 1 when the agent checks it fails every job start
    under the hardened unit (``agent_error``) although nothing is wrong."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("systemd-mount", MOUNT), ("systemd-umount", UMOUNT)):
        tool = bin_dir / name
        tool.write_text(f"#!{sys.executable}\n{body}")
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    outputs = OutputVolumes(tmp_path / "jobs", "65534:65534", SystemdMounter())
    target = outputs.prepare("j-1")
    try:
        assert outputs.make("j-1", 1024 * 1024, 10) == target
        assert os.path.ismount(target)
        usage = outputs.usage("j-1")
        assert usage is not None and usage.free_bytes > 0
    finally:
        outputs.remove("j-1")
    assert not os.path.ismount(target)
    assert not (tmp_path / "jobs" / "j-1").exists()
