"""Start the real agent as a separate process and talk to it over HTTP."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.helpers.env import seconds

REPO = Path(__file__).resolve().parents[2]
FAKE_GPU_LAUNCHER = REPO / "tests" / "helpers" / "fake_gpu_agent.py"


def agent_command() -> list[str]:
    exe = shutil.which("cloudbender-agent", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "agent.cli"]


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``cloudbender-agent ARGS`` as a person runs it: its exit code and text output."""
    return subprocess.run(
        [*agent_command(), *args],
        capture_output=True,
        text=True,
        timeout=seconds(timeout),
        check=False,
    )


@dataclass
class AgentProcess:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url(path), timeout=seconds(5)) as response:
                return int(response.status), response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def get_json(self, path: str) -> tuple[int, Any]:
        code, body = self.get(path)
        return code, json.loads(body)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.log().splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
        return events

    def wait_answering(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + seconds(timeout)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited with {self.proc.returncode}:\n{self.log()}")
            try:
                self.get("/healthz")
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"agent did not answer within {timeout} s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 5.0) -> tuple[int, float]:
        """Send ``sig``; return the exit status and how long the exit took."""
        start = time.monotonic()
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=seconds(timeout))
        return code, time.monotonic() - start


@contextmanager
def running_agent(
    config_path: Path,
    port: int,
    tmp_path: Path,
    *,
    env: dict[str, str] | None = None,
    fake_gpus: str | None = None,
    wait: bool = True,
) -> Iterator[AgentProcess]:
    """Run ``cloudbender-agent run`` (or the fake-GPU launcher with scenario ``fake_gpus``)."""
    if fake_gpus is None:
        cmd = [*agent_command(), "run", "--config", str(config_path)]
    else:
        cmd = [sys.executable, str(FAKE_GPU_LAUNCHER), fake_gpus, str(config_path)]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("NOTIFY_SOCKET", None) if "NOTIFY_SOCKET" not in (env or {}) else None
    full_env["PYTHONPATH"] = str(REPO)
    log_path = tmp_path / f"agent-{time.monotonic_ns()}.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=full_env)
    agent = AgentProcess(proc, port, log_path)
    try:
        if wait:
            agent.wait_answering()
        yield agent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
