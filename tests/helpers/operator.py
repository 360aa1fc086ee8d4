"""Running the CLI as another user (an operator who is not root), for the control socket.

The test's own interpreter may sit where other users cannot reach it (a pyenv under
``/root``, mode 0700): then the system's Python of the same version runs the CLI, with
this checkout and the virtualenv's packages on its path.
"""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.helpers.env import seconds
from tests.helpers.reachable import shared_dir

REPO = Path(__file__).resolve().parents[2]
NOBODY = 65534


@contextlib.contextmanager
def runtime_dir() -> Iterator[Path]:
    """A directory like the unit's RuntimeDirectory= (0755), reachable by other uids (a
    test's tmp_path is 0700), with a short path (a socket path is at most 107 bytes)."""
    with shared_dir("cbctl-") as path:
        yield path


def operator_config(directory: Path, sock: Path, group: str) -> Path:
    """What an operator who is not root can read: the control section only, 0644 (the
    real config is root-only)."""
    path = directory / "operator.yaml"
    path.write_text(yaml.safe_dump({"control": {"socket": str(sock), "group": group}}))
    path.chmod(0o644)
    return path


def _world_reachable(path: Path) -> bool:
    path = path.resolve()
    for parent in path.parents:
        if not parent.stat().st_mode & stat.S_IXOTH:
            return False
    return bool(path.stat().st_mode & stat.S_IXOTH)


def _python() -> str:
    if _world_reachable(Path(sys.executable)):
        return sys.executable
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    system = Path("/usr/bin") / version
    if system.exists() and _world_reachable(system):
        return str(system)
    pytest.skip(f"no {version} that uid {NOBODY} can run")


def cli_as(uid: int, gid: int, groups: list[int], *args: str) -> subprocess.CompletedProcess[str]:
    """``cloudbender-agent ARGS`` as ``uid:gid`` with exactly ``groups`` besides."""
    site = sysconfig.get_paths()["purelib"]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{REPO}{os.pathsep}{site}", "LANG": "C.UTF-8"}
    return subprocess.run(
        [_python(), "-m", "agent.cli", *args],
        user=uid,
        group=gid,
        extra_groups=groups,
        env=env,
        cwd="/",
        capture_output=True,
        text=True,
        timeout=seconds(60),
        check=False,
    )
