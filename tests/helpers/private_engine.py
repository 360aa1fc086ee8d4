"""A Docker engine of a test's own, to stop and start while an agent uses it.

Everything it has is its own: socket, ``--data-root``, ``--exec-root`` (so its own
containerd), pid file, containerd namespaces, cgroup parent and network namespace; no
bridge, no iptables rules. Stopping it can never touch the main engine's containers,
and nothing but the pid it started is ever signalled. The local test image is copied
in from the main engine (``docker save | docker load``), never pulled.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import docker

from tests.helpers.env import seconds
from tests.helpers.jobnode import unmount_under

DOCKERD = shutil.which("dockerd") or "/usr/sbin/dockerd"
UNSHARE = shutil.which("unshare") or "/usr/bin/unshare"
# dockerd gives running containers this long on SIGTERM, then SIGKILLs them; kept short
# so that the engine is gone within the test's 10 s for engine_down.
SHUTDOWN_TIMEOUT_S = 2


@dataclass
class PrivateEngine:
    root: Path
    # containerd namespaces and the cgroup parent: containerd accepts only letters and
    # digits joined by single [._-], which mkdtemp's random suffix does not keep to
    # ("cbe-01d54b-_zrdc78e" failed one start in about twenty).
    name: str
    proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"unix://{self.root}/docker.sock"

    def start(self) -> None:
        """Start dockerd (again) on the same dirs; return once it answers."""
        assert self.proc is None, "already running"
        name = self.name
        (self.root / "daemon.json").write_text(json.dumps({}))  # not /etc/docker's
        # Its own network namespace: a dockerd with --bridge=none deletes the host's
        # docker0 at start (libnetwork's removeDefaultBridgeInterface), which would cut
        # the main engine's bridge from under every other test.
        args = [
            UNSHARE,
            "--net",
            "--",
            DOCKERD,
            f"--config-file={self.root}/daemon.json",
            f"--host={self.host}",
            f"--data-root={self.root}/data",
            f"--exec-root={self.root}/exec",
            f"--pidfile={self.root}/docker.pid",
            "--bridge=none",
            "--iptables=false",
            "--ip6tables=false",
            f"--containerd-namespace={name}",
            f"--containerd-plugins-namespace={name}-plugins",
            f"--cgroup-parent={name}",
            f"--shutdown-timeout={SHUTDOWN_TIMEOUT_S}",
        ]
        with (self.root / "dockerd.log").open("ab") as log:
            proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        self.proc = proc
        deadline = time.monotonic() + seconds(60)
        while not self.answers():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"private dockerd did not start:\n{self.log()[-3000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM our dockerd and wait for it to exit (it stops its containers first)."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=seconds(60))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def answers(self) -> bool:
        try:
            client = docker.DockerClient(base_url=self.host, timeout=5)
        except docker.errors.DockerException:
            return False
        try:
            return bool(client.ping())
        except docker.errors.DockerException:
            return False
        finally:
            client.close()

    def client(self) -> docker.DockerClient:
        return docker.DockerClient(base_url=self.host, timeout=30)

    def load_image(self, image: str) -> None:
        save = subprocess.Popen(["docker", "save", image], stdout=subprocess.PIPE)
        load = subprocess.run(
            ["docker", "-H", self.host, "load"],
            stdin=save.stdout,
            capture_output=True,
            timeout=seconds(120),
            check=False,
        )
        assert save.stdout is not None
        save.stdout.close()
        assert save.wait(timeout=seconds(60)) == 0 and load.returncode == 0, load.stderr

    def log(self) -> str:
        return (self.root / "dockerd.log").read_text(errors="replace")

    def _leftover_containerd(self) -> None:
        # A dockerd that had to be SIGKILLed leaves its own containerd behind.
        pidfile = self.root / "exec" / "containerd" / "containerd.pid"
        with contextlib.suppress(OSError, ValueError):
            pid = int(pidfile.read_text())
            if Path(f"/proc/{pid}/comm").read_text().strip() == "containerd":
                os.kill(pid, signal.SIGTERM)


@contextlib.contextmanager
def private_engine(image: str) -> Iterator[PrivateEngine]:
    """A started private engine holding ``image``; stopped and its dirs removed at the
    end whatever happened. The root is short: a unix socket path must fit 108 bytes."""
    tag = uuid.uuid4().hex[:12]
    root = Path(tempfile.mkdtemp(prefix=f"cbe-{tag[:6]}-", dir="/tmp"))
    engine = PrivateEngine(root, name=f"cbtest-{tag}")
    try:
        engine.start()
        engine.load_image(image)
        yield engine
    finally:
        try:
            engine.stop()
            engine._leftover_containerd()
        finally:
            unmount_under(root)
            shutil.rmtree(root, ignore_errors=True)
