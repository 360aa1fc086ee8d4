"""The installed command as a person runs it."""

from __future__ import annotations

import ctypes.util
import json
import subprocess
from pathlib import Path

import pytest

from tests.helpers.proc import run_cli


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args)


def test_help_lists_the_commands() -> None:
    proc = _run("--help")
    assert proc.returncode == 0
    for command in ("run", "check-config", "gpus", "status"):
        assert f"    {command} " in proc.stdout or f"    {command}\n" in proc.stdout, proc.stdout


def test_version() -> None:
    proc = _run("--version")
    assert proc.returncode == 0
    assert proc.stdout.startswith("cloudbender-agent ")


@pytest.mark.skipif(
    ctypes.util.find_library("nvidia-ml") is not None, reason="this machine has an NVIDIA driver"
)
def test_gpus_json_on_a_machine_without_a_driver(tmp_path: Path) -> None:
    proc = _run("gpus", "--json", "--config", str(tmp_path / "absent.yaml"))
    assert proc.returncode == 0, proc.stderr
    document = json.loads(proc.stdout)
    assert document["gpus"] == []
    assert document["available"] is False
    assert "driver" in document["reason"]
    table = _run("gpus", "--config", str(tmp_path / "absent.yaml"))
    assert table.returncode == 0
    assert "No GPUs" in table.stdout
