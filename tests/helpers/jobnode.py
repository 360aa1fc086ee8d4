"""A node under test: the reference control plane and a real agent process, on loopback.

Jobs run on the real Docker engine with the local busybox test image.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import docker.errors

from agent.controlplane import ThreadedControlPlane
from tests.helpers.env import seconds, valid_config, write_config
from tests.helpers.proc import AgentProcess, run_cli, running_agent

TOKEN = "s3cr3t-token-for-tests-0123456789"
IMAGE = "cloudbender-test/busybox:latest"
TERMINAL = {"succeeded", "failed", "cancelled", "timed_out"}


@dataclass
class JobNode:
    cp: ThreadedControlPlane
    agent: AgentProcess
    node_id: str
    state_dir: Path
    data_dir: Path
    docker: docker.DockerClient
    config_path: Path
    tmp_path: Path
    _stack: contextlib.ExitStack

    def restart_agent(self, between: Callable[[], None] | None = None) -> None:
        """SIGTERM the agent (exit 0 expected), run ``between``, start it again."""
        code, _ = self.agent.stop()
        assert code == 0, self.agent.log()
        if between is not None:
            between()
        self.agent = self._stack.enter_context(
            running_agent(self.config_path, self.agent.port, self.tmp_path)
        )

    def audit_verify(self) -> subprocess.CompletedProcess[str]:
        """``cloudbender-agent audit --verify`` on this node's config, as a person runs it."""
        return run_cli("audit", "--verify", "--config", str(self.config_path), timeout=120)

    def respawn(self, env: dict[str, str] | None = None, *, wait_exit: float = 60) -> int:
        """Wait for the agent to exit by itself (a crash point's SIGKILL), SIGKILL it if
        it does not within ``wait_exit`` s, then start it again with ``env``. Returns the
        exit status of the old process (-9 for SIGKILL)."""
        try:
            code = self.agent.proc.wait(timeout=seconds(wait_exit))
        except subprocess.TimeoutExpired:
            self.agent.proc.kill()
            code = self.agent.proc.wait(timeout=10)
        self.agent = self._stack.enter_context(
            running_agent(self.config_path, self.agent.port, self.tmp_path, env=env)
        )
        return code

    def assign(self, job_id: str, script: str | None = None, **fields: Any) -> None:
        message: dict[str, Any] = {
            "type": "job.assign",
            "job_id": job_id,
            "image": {"ref": IMAGE},
            "datastore": "vitals",
        }
        if script is not None:
            message["command"] = ["sh", "-c", script]
        message.update(fields)
        self.cp.send(self.node_id, message)

    def reply(self, job_id: str, timeout: float = 20) -> dict[str, Any]:
        """The first job.accepted or job.rejected for ``job_id``."""
        deadline = time.monotonic() + seconds(timeout)
        while time.monotonic() < deadline:
            node = self.cp.node(self.node_id)
            assert node is not None
            for received in node.messages:
                if received.type in ("job.accepted", "job.rejected") and (
                    received.data.get("job_id") == job_id
                ):
                    return received.data
            time.sleep(0.02)
        raise AssertionError(f"no answer to job.assign {job_id}")

    def messages(self, kind: str, job_id: str) -> list[dict[str, Any]]:
        node = self.cp.node(self.node_id)
        assert node is not None
        return [m for m in node.of_type(kind) if m.get("job_id") == job_id]

    def states(self, job_id: str) -> list[str]:
        return [m["state"] for m in self.messages("job.state", job_id)]

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``cloudbender-agent ARGS --config <this node's config>``, as an operator runs it."""
        return run_cli(*args, "--config", str(self.config_path))

    def wait_state(self, job_id: str, state: str, timeout: float = 60) -> dict[str, Any]:
        """The job's ``job.state`` ``state``; fails at once if the job ended without it
        (rather than waiting ``timeout`` for a state that can no longer come)."""
        found = self.cp.wait_for_message(
            self.node_id,
            "job.state",
            predicate=lambda m: m["job_id"] == job_id and m["state"] in {state, *TERMINAL},
            timeout=seconds(timeout),
        )
        assert found["state"] == state, (
            f"{job_id} ended without reaching {state}: {found}\n{self.agent.log()[-4000:]}"
        )
        return found

    def wait_end(self, job_id: str, timeout: float = 60) -> dict[str, Any]:
        return self.cp.wait_for_message(
            self.node_id,
            "job.state",
            predicate=lambda m: m["job_id"] == job_id and m["state"] in TERMINAL,
            timeout=seconds(timeout),
        )

    def containers(self, job_id: str | None = None) -> list[Any]:
        labels = [f"cloudbender.node-id={self.node_id}"]
        if job_id is not None:
            labels.append(f"cloudbender.job-id={job_id}")
        return list_containers(self.docker, labels)

    def wait_gone(self, job_id: str, timeout: float = 5) -> None:
        """Until no container of ``job_id`` is left: a job's container is removed just
        after its end is recorded and sent, so a few seconds after ``wait_end``."""
        deadline = time.monotonic() + seconds(timeout)
        while self.containers(job_id):
            if time.monotonic() > deadline:
                raise AssertionError(f"the container of {job_id} is still there")
            time.sleep(0.05)
        while self.output_dir(job_id).parent.exists():
            if time.monotonic() > deadline:
                raise AssertionError(f"the output of {job_id} is still there")
            time.sleep(0.05)

    def wait_container(self, job_id: str, status: str = "running", timeout: float = 30) -> Any:
        deadline = time.monotonic() + seconds(timeout)
        while time.monotonic() < deadline:
            found = self.containers(job_id)
            if found and found[0].status == status:
                return found[0]
            time.sleep(0.05)
        raise AssertionError(f"no {status} container for {job_id}")

    def output_dir(self, job_id: str) -> Path:
        """The job's output on the node (gone once its results are spooled)."""
        return self.state_dir / "jobs" / job_id / "output"

    def result(self, job_id: str, path: str) -> bytes:
        """A result file as the control plane received and accepted it."""
        return self.cp.result_files(self.node_id, job_id)[path].read_bytes()


@contextlib.contextmanager
def job_node(
    tmp_path: Path,
    client: docker.DockerClient,
    *,
    heartbeat_s: float = 15,
    agent_env: dict[str, str] | None = None,
    node_id: str | None = None,
    cp_options: dict[str, Any] | None = None,
    **overrides: Any,
) -> Iterator[JobNode]:
    """Start a control plane and an agent whose config ``overrides`` may amend per section
    (``agent_env``: extra environment for the first agent process; ``cp_options``: more
    arguments of :class:`ControlPlane`, such as ``ssl``)."""
    node_id = node_id or f"jobs-{uuid.uuid4().hex[:10]}"
    cp = ThreadedControlPlane(
        tokens={TOKEN: node_id}, heartbeat_s=heartbeat_s, **(cp_options or {})
    )
    cp.start()
    config = valid_config(tmp_path)
    data_dir = Path(config["datastores"][0]["path"])
    data_dir.chmod(0o755)  # the job runs as nobody: the consumer makes data readable to it
    (data_dir / "vitals.csv").write_text("patient,hr\n1,80\n2,95\n")
    (data_dir / "vitals.csv").chmod(0o644)
    config["node"]["id"] = node_id
    config["control_plane"]["url"] = cp.url
    config["control_plane"]["reconnect"] = {"initial_s": 0.2, "max_s": 2}
    config["runtime"] = {"allowed_images": ["cloudbender-test/*"], "pull": False, "stop_grace_s": 2}
    config["limits"] = {"max_concurrent_jobs": 2, "max_memory_mib": 256, "max_cpus": 1}
    for section, values in overrides.items():
        if isinstance(values, dict):
            config.setdefault(section, {}).update(values)
        else:
            config[section] = values
    port = int(config["health"]["listen"].rsplit(":", 1)[1])
    config_path = write_config(tmp_path, config)
    try:
        with contextlib.ExitStack() as stack:
            agent = stack.enter_context(running_agent(config_path, port, tmp_path, env=agent_env))
            cp.wait_for_node(node_id, timeout=seconds(20))
            yield JobNode(
                cp,
                agent,
                node_id,
                Path(config["state_dir"]),
                data_dir,
                client,
                config_path,
                tmp_path,
                stack,
            )
    finally:
        cp.stop()
        try:
            for container in list_containers(client, [f"cloudbender.node-id={node_id}"]):
                # The agent may be removing it at this very moment (409, then 404).
                with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                    container.remove(force=True)
        finally:
            unmount_under(tmp_path)


def list_containers(client: docker.DockerClient, labels: list[str]) -> list[Any]:
    """Every container with all of ``labels``. The SDK inspects each listed container;
    one that the agent removes in between (it removes a job's container just after the
    job's end is sent) makes that fail with 404, so the listing is simply taken again."""
    for _ in range(50):
        try:
            return list(client.containers.list(all=True, filters={"label": labels}))
        except docker.errors.NotFound:
            continue
    raise AssertionError("the container list kept changing")


def mounts_under(root: Path) -> list[Path]:
    """Mount points at or below ``root`` (job outputs an agent left mounted)."""
    found = []
    prefix = str(root.resolve())
    with open("/proc/self/mountinfo") as f:
        for line in f:
            # Field 5 is the mount point, with spaces and the like octal-escaped.
            point = line.split()[4].encode().decode("unicode_escape")
            if point == prefix or point.startswith(prefix + "/"):
                found.append(Path(point))
    return found


def unmount_under(root: Path) -> None:
    """Detach every mount below ``root``, deepest first: a test that killed its agent
    must not leave loop devices behind."""
    for point in sorted(mounts_under(root), key=lambda p: len(p.parts), reverse=True):
        subprocess.run(["umount", "--lazy", str(point)], check=False, capture_output=True)
