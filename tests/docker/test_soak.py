"""A short soak (bench/soak.py): a few jobs under control-plane restarts and agent kills."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import docker
import pytest

from tests.helpers.env import seconds

pytestmark = pytest.mark.docker
SOAK = Path(__file__).resolve().parents[2] / "bench" / "soak.py"


def test_a_short_soak_loses_duplicates_corrupts_and_leaves_nothing(
    docker_client: docker.DockerClient, test_image: str
) -> None:
    """Faults seen in a chaos run (a kill while spooling lost results and still reported
    success; containers of resumed jobs were left behind), at a size that fits
    `make test`; `make soak` runs the full one."""
    args = ["--jobs", "6", "--cp-restarts", "2", "--agent-kills", "2", "--seed", "7"]
    done = subprocess.run(
        [sys.executable, str(SOAK), *args, "--max-seconds", str(seconds(180))],
        capture_output=True,
        text=True,
        timeout=seconds(420),
        check=False,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    figures = {
        line.split(":")[0].strip(): line.split(":")[1].split()[0]
        for line in out.splitlines()
        if line.startswith(("lost ", "duplicated ", "corrupted ", "containers left "))
    }
    assert figures == {"lost": "0", "duplicated": "0", "corrupted": "0", "containers left": "0"}
