"""Run ``cloudbender-cp`` as a user would: ``serve`` as a process, the commands as others."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.helpers.env import free_port, seconds
from tests.helpers.proc import REPO

TOKEN = "s3cr3t-token-for-cli-tests-0123456789"


def cp_command() -> list[str]:
    """The installed console script, else ``python -m agent.controlplane``."""
    exe = shutil.which("cloudbender-cp", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "agent.controlplane"]


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    env.pop("XDG_RUNTIME_DIR", None)  # every test names its socket
    return env


@dataclass
class CpServer:
    proc: subprocess.Popen[str]
    url: str
    control: Path
    results_dir: Path
    log_path: Path

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """``cloudbender-cp ARGS --control <this server's socket>``, to its end."""
        command = [*cp_command(), *args, "--control", str(self.control)]
        return subprocess.run(
            command, capture_output=True, text=True, env=_env(), timeout=seconds(timeout)
        )

    def json(self, *args: str) -> Any:
        done = self.run(*args, "--json")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self, name: str) -> list[dict[str, Any]]:
        """The server's JSON log lines of event ``name``."""
        found = []
        for line in self.log().splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and event.get("event") == name:
                found.append(event)
        return found


def write_tokens(tmp_path: Path, token: str = TOKEN) -> Path:
    path = tmp_path / "cp-tokens"
    path.write_text(f"{token}\n")
    path.chmod(0o600)
    return path


@contextmanager
def running_cp(
    tmp_path: Path,
    *,
    control: Path | None = None,
    args: Sequence[str] = (),
    umask: int | None = None,
) -> Iterator[CpServer]:
    """``cloudbender-cp serve`` on a free loopback port, its socket at ``control``
    (default ``tmp_path/cp.sock``); ``umask``: the one it is started under."""
    control = control or tmp_path / "cp.sock"
    results = tmp_path / "cp-results"
    command = [*cp_command(), "serve", "--listen", f"127.0.0.1:{free_port()}"]
    command += ["--token-file", str(write_tokens(tmp_path)), "--control", str(control)]
    command += ["--results-dir", str(results), "--heartbeat-s", "2", "--log-format", "json"]
    command += args
    log_path = tmp_path / "cp-serve.log"

    def start_under_umask() -> None:
        if umask is not None:
            os.umask(umask)

    with log_path.open("w") as log_file:
        proc = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=log_file,
            text=True,
            env=_env(),
            preexec_fn=start_under_umask,
        )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("ws://"), log_path.read_text()
        assert proc.stdout.readline().strip() == f"control: {control}"
        yield CpServer(proc, url, control, results, log_path)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=seconds(10))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
