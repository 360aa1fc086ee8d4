"""scripts/gpu-check.sh: runs on a machine without a GPU, and compares for real."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.helpers.env import seconds

ROOT = Path(__file__).parents[2]
SCRIPT = ROOT / "scripts" / "gpu-check.sh"
UUID = "GPU-8f6c1d2e-0000-1111-2222-333344445555"


def run(path: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": path, "PYTHON": sys.executable}
    return subprocess.run(
        [str(SCRIPT)], env=env, capture_output=True, text=True, timeout=seconds(120), cwd=tmp_path
    )


def test_without_a_gpu_it_says_no_gpu_and_exits_0(tmp_path: Path) -> None:
    """Attack: a check script that fails (or pretends to pass) where there is no GPU
    would be skipped or trusted; it must say "no GPU" and succeed."""
    result = run("/usr/bin:/bin", tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no GPU" in result.stdout


def test_a_gpu_the_agent_does_not_list_fails_the_check(tmp_path: Path) -> None:
    """Attack: an inventory that misses a GPU nvidia-smi sees must fail the check, not
    print a table and exit 0."""
    fake = tmp_path / "bin"
    fake.mkdir()
    smi = fake / "nvidia-smi"
    smi.write_text(
        "#!/bin/sh\n"
        'case "$*" in\n'
        f'  *-L*) echo "GPU 0: NVIDIA H200 (UUID: {UUID})";;\n'
        f'  *query-gpu=uuid,*) echo "{UUID}, NVIDIA H200, 00000000:17:00.0, 143771, 1, '
        '[N/A], Enabled";;\n'
        '  *) echo "550.54.15";;\n'
        "esac\n"
    )
    smi.chmod(0o755)
    result = run(f"{fake}:/usr/bin:/bin", tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"MISSING {UUID} NVIDIA H200" in result.stdout
    assert "gpu-check: FAILED" in result.stdout
