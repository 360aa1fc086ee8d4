"""The runtime's value types and the interface every container backend implements.

Nothing here talks to an engine. :class:`Runtime` is what the job manager calls;
``agent.runtime.docker.DockerRuntime`` is the one real implementation.

Every method of :class:`Runtime` is synchronous and blocks (the Docker SDK does):
the caller runs each in a worker thread (``await asyncio.to_thread(rt.wait, cid, t)``)
and never on the event loop. Implementations are thread-safe: several jobs call them
at once. Every error is a subclass of :class:`agent.errors.ContainerRuntimeError`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

# Labels on every job container; ``list_jobs`` finds a node's containers by them.
LABEL_MANAGED = "cloudbender.managed"
LABEL_NODE_ID = "cloudbender.node-id"
LABEL_JOB_ID = "cloudbender.job-id"

# Where the job sees its three mounts (docs/protocol.md §7).
DATA_TARGET = "/opt/data"
MODEL_TARGET = "/opt/model"
OUTPUT_TARGET = "/opt/output"


@dataclass(frozen=True)
class RuntimeInfo:
    """What the engine is, for ``hello.inventory.runtime`` and ``/status``.

    ``reachable`` is ``False`` when the engine did not answer; ``error`` then says
    why in words, ``version`` is ``None`` and ``gpu_support`` is ``False``.
    ``gpu_path`` is how jobs get GPUs (``legacy``, ``cdi``; ``None``: they cannot) and
    ``gpu_why`` the reason in words (``agent.runtime.gpupath``); not part of ``hello``.
    """

    engine: str
    version: str | None
    gpu_support: bool
    reachable: bool
    error: str | None
    gpu_path: str | None = None
    gpu_why: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The ``inventory.runtime`` object of ``hello``: engine, version, gpu_support."""
        return {"engine": self.engine, "version": self.version, "gpu_support": self.gpu_support}


@dataclass(frozen=True)
class ContainerSpec:
    """Everything needed to create one job container; the job manager fills it in.

    ``image_id`` is the resolved local id (``sha256:…``, from ``Runtime.image_id`` or
    ``Runtime.pull``); the container is created from the id, never from ``image``,
    so a tag moved in between cannot change what runs. ``image`` (the reference as
    assigned) is kept for logs and the audit ledger.

    Host paths must be absolute. ``output_dir`` must already exist and be writable by
    ``user`` (the job manager chowns it); ``data_dir`` and ``model_dir`` must be
    readable by ``user``. ``env`` is the assignment's ``env``: it may not set the
    reserved names (``agent.runtime.spec.RESERVED_ENV``, ``NVIDIA_*``). Limits are
    the already-tightened values (config caps, then the assignment's).

    The spec is checked when the create arguments are built
    (``agent.runtime.spec.spec_problems``), not here, so that every problem is
    reported at once. ``command`` and ``env`` are copied into immutable values.
    """

    job_id: str
    node_id: str
    image: str
    image_id: str
    command: Sequence[str] | None
    env: Mapping[str, str]
    user: str
    data_dir: Path
    model_dir: Path | None
    output_dir: Path
    cpus: float
    memory_mib: int
    pids: int
    tmp_mib: int
    gpu_uuids: tuple[str, ...] = ()
    runtime: str = "runc"
    shm_mib: int = 64

    def __post_init__(self) -> None:
        # A string is a sequence too: left as it is, the spec check refuses it.
        if self.command is not None and not isinstance(self.command, str):
            object.__setattr__(self, "command", tuple(self.command))
        object.__setattr__(self, "env", MappingProxyType(dict(self.env)))
        object.__setattr__(self, "gpu_uuids", tuple(self.gpu_uuids))


@dataclass(frozen=True)
class ContainerState:
    """One container as the engine last described it.

    ``status`` is the engine's word (``created``, ``running``, ``exited``, ``dead``…).
    ``exit_code`` is ``None`` until the container has run and stopped. ``oom_killed``
    is the engine's ``State.OOMKilled``: the kernel killed a process of the job for
    exceeding its memory limit. Times are UTC, ``None`` when not (yet) happened.
    ``error`` is the engine's message when it failed to start the container.
    """

    id: str
    status: str
    running: bool
    exit_code: int | None
    oom_killed: bool
    started_at: datetime | None
    finished_at: datetime | None
    labels: Mapping[str, str] = field(default_factory=dict)
    error: str | None = None

    @property
    def job_id(self) -> str | None:
        """The job this container runs, from its label; ``None`` if not a job container."""
        return self.labels.get(LABEL_JOB_ID)

    @classmethod
    def from_inspect(cls, attrs: Mapping[str, Any]) -> ContainerState:
        """The state in an engine's inspect answer (``container.attrs``)."""
        state = attrs.get("State") or {}
        status = str(state.get("Status") or "unknown")
        code = state.get("ExitCode")
        return cls(
            id=str(attrs.get("Id")),
            status=status,
            running=bool(state.get("Running")),
            # "created" carries ExitCode 0 before the container ever ran.
            exit_code=int(code) if status in ("exited", "dead") and code is not None else None,
            oom_killed=bool(state.get("OOMKilled")),
            started_at=_engine_time(state.get("StartedAt")),
            finished_at=_engine_time(state.get("FinishedAt")),
            labels=MappingProxyType(dict((attrs.get("Config") or {}).get("Labels") or {})),
            error=state.get("Error") or None,
        )


def _engine_time(text: object) -> datetime | None:
    # Docker writes "0001-01-01T00:00:00Z" for a time that has not happened.
    if not isinstance(text, str) or not text or text.startswith("0001-"):
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


class Runtime(Protocol):
    """A container engine, as the job manager uses it.

    All methods block; call them through ``asyncio.to_thread``. Container ids are the
    engine's full ids. A method given an id the engine does not know raises
    :class:`~agent.errors.ContainerNotFound`, except ``inspect`` (``None``) and
    ``remove`` (nothing to do).
    """

    def info(self) -> RuntimeInfo:
        """What the engine is and whether it answers. Never raises."""
        ...

    def create(self, spec: ContainerSpec) -> str:
        """Create the job's container, read it back and verify every isolation setting
        (docs/runtime.md); return its id. The container is not started.

        On any difference the container is removed and
        :class:`~agent.errors.IsolationMismatch` raised, so a container that exists is
        one that passed. Raises :class:`~agent.errors.InvalidContainerSpec`,
        :class:`~agent.errors.GpuUnsupported`, :class:`~agent.errors.ImageNotFound`
        (never pulls), :class:`~agent.errors.ContainerExists` or
        :class:`~agent.errors.ContainerCreateError`.
        """
        ...

    def start(self, container_id: str) -> None:
        """Start a created container. Raises :class:`~agent.errors.ContainerStartError`."""
        ...

    def wait(self, container_id: str, timeout_s: float | None) -> ContainerState:
        """Block until the container has stopped, then return its final state.

        ``timeout_s=None`` waits for ever. When the timeout passes first,
        :class:`~agent.errors.WaitTimeout` is raised and the container keeps running:
        the caller decides (``stop``, then ``wait`` again).
        """
        ...

    def stop(self, container_id: str, grace_s: float) -> None:
        """SIGTERM, ``grace_s`` seconds, then SIGKILL, all done by the engine; returns
        once the container has stopped. Stopping a stopped container does nothing."""
        ...

    def remove(self, container_id: str) -> None:
        """Remove the container, killing it if it runs. Idempotent: a missing container
        is fine."""
        ...

    def inspect(self, container_id: str) -> ContainerState | None:
        """The container's state now; ``None`` if the engine has no such container."""
        ...

    def list_jobs(self, node_id: str) -> list[ContainerState]:
        """Every job container of this node (by label), running or not; for re-adoption
        after a restart and for reaping."""
        ...

    def image_id(self, ref: str, digest: str | None) -> str | None:
        """The local image id for ``ref``, or ``None`` if there is no such local image.

        With a ``digest`` (``sha256:…``) the local image must carry it in its
        ``RepoDigests``; a local image for ``ref`` that does not raises
        :class:`~agent.errors.ImageDigestMismatch` (pull ``ref`` by digest, or fail the
        job ``image_digest_mismatch``). Never contacts a registry.
        """
        ...

    def pull(
        self, ref: str, digest: str | None, auth: Mapping[str, str] | None, timeout_s: float
    ) -> str:
        """Pull ``ref`` (by ``digest`` when given) and return the local image id.

        ``auth`` (``username``/``password``, or a token) is used for this one pull and
        never logged or kept. Progress is logged. Raises
        :class:`~agent.errors.ImagePullFailed` when the pull fails or has not finished
        after ``timeout_s``, :class:`~agent.errors.ImageDigestMismatch` when the pulled
        image lacks ``digest``.
        """
        ...

    def logs(self, container_id: str, max_bytes: int) -> bytes:
        """The last ``max_bytes`` (at most) of the container's stdout and stderr,
        interleaved as the engine kept them. The bytes are the job's, hostile: escape
        before printing. Raises :class:`~agent.errors.ContainerNotFound` or
        :class:`~agent.errors.ContainerRuntimeError`."""
        ...

    def applied_isolation(self, container_id: str) -> dict[str, Any]:
        """The isolation settings as the engine reports them, JSON-ready, for the audit
        ledger. Holds no host path."""
        ...
