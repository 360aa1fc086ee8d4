"""The demo's two processes on loopback: the reference control plane and a real agent.

:class:`DemoNode` writes the agent's config, token and datastore under one directory,
starts :class:`~agent.controlplane.ThreadedControlPlane` in this process and
``cloudbender-agent run`` as a child process (its JSON log in ``agent.log``), and stops
both, agent first so that it never reconnects to a closed port in a loop.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import yaml

from agent.controlplane import ThreadedControlPlane
from agent.demo import DemoError

NODE_ID = "demo-node"
DATASTORE = "icu-vitals"
JOB_UID = 65534


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class DemoNode:
    """Everything under ``workdir``: ``agent.yaml``, ``token``, ``datastore/icu-vitals``,
    ``state/`` (the agent's), ``cp-results/`` (what the control plane accepted) and
    ``agent.log``. ``cpus``/``memory_mib`` are the consumer's caps in the config."""

    def __init__(self, workdir: Path, image_pattern: str, *, cpus: int, memory_mib: int) -> None:
        self.workdir = workdir
        self.config_path = workdir / "agent.yaml"
        self.datastore = workdir / "datastore" / DATASTORE
        self.state_dir = workdir / "state"
        self.results_dir = workdir / "cp-results"
        self.log_path = workdir / "agent.log"
        self.health = f"127.0.0.1:{_free_port()}"
        token = secrets.token_urlsafe(24)
        self.cp = ThreadedControlPlane(
            tokens={token: NODE_ID}, results_dir=self.results_dir, auto_ack=True
        )
        self._token, self._image_pattern = token, image_pattern
        self._cpus, self._memory_mib = cpus, memory_mib
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def prepare(self) -> None:
        """The datastore directory, readable by the job user (nobody) as the consumer
        would make it; the private token file."""
        self.datastore.mkdir(parents=True, exist_ok=True)
        for path in (self.datastore.parent, self.datastore):
            path.chmod(0o755)
        self.results_dir.mkdir(exist_ok=True)
        token_file = self.workdir / "token"
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self._token + "\n")

    def write_dataset(self, name: str, data: bytes) -> Path:
        path = self.datastore / name
        path.write_bytes(data)
        path.chmod(0o644)
        return path

    def _config(self) -> dict[str, Any]:
        return {
            "node": {"id": NODE_ID, "labels": {"site": "demo"}},
            "control_plane": {
                "url": self.cp.url,
                "token_file": str(self.workdir / "token"),
                "reconnect": {"initial_s": 0.2, "max_s": 2},
            },
            "state_dir": str(self.state_dir),
            "runtime": {
                "allowed_images": [self._image_pattern],
                "pull": False,
                "job_user": f"{JOB_UID}:{JOB_UID}",
                "stop_grace_s": 5,
            },
            "datastores": [
                {
                    "name": DATASTORE,
                    "path": str(self.datastore),
                    "description": "ICU vital signs (synthetic patients)",
                }
            ],
            "limits": {
                "max_concurrent_jobs": 1,
                "max_timeout_s": 600,
                "max_cpus": self._cpus,
                "max_memory_mib": self._memory_mib,
                "pids": 256,
                "tmp_mib": 64,
            },
            "results": {"max_bytes": 64 * 1024 * 1024, "max_files": 16, "retention_h": 24},
            "health": {"listen": self.health},
            "logging": {"level": "info", "format": "json"},
        }

    def start(self, timeout_s: float = 30.0) -> None:
        """Start the control plane, then the agent; return once the agent said hello.
        Raises :class:`DemoError` (with the agent's log) if it exits or never connects."""
        self.cp.start()
        self.config_path.write_text(yaml.safe_dump(self._config(), sort_keys=False))
        self._log = open(self.log_path, "ab")  # noqa: SIM115  (closed in stop())
        command = [sys.executable, "-m", "agent.cli", "run", "--config", str(self.config_path)]
        self._proc = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise DemoError(
                    f"the agent exited with {self._proc.returncode}:\n{self.log_tail()}"
                )
            try:
                self.cp.wait_for_node(NODE_ID, timeout=0.5)
                return
            except TimeoutError:
                continue
        raise DemoError(f"the agent did not connect within {timeout_s:g} s:\n{self.log_tail()}")

    @property
    def agent_pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no agent log)"

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM the agent and wait (SIGKILL after ``timeout_s``), then stop the control
        plane. Idempotent. Returns the agent's exit status (None if it never ran)."""
        code = None
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.send_signal(signal.SIGTERM)
            try:
                code = self._proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                code = self._proc.wait()
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        self.cp.stop()
        return code
