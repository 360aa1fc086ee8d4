"""The agent's one exception root.

Every module raises a subclass of :class:`AgentError`, chained with ``raise … from``
to the low-level cause; only ``agent.cli`` turns them into exit codes.

::

    AgentError
    ├── ConfigError          the YAML config is unreadable or invalid (exit 78, EX_CONFIG)
    ├── GpuError             the GPU backend failed in a way the caller must see
    ├── HealthServerError    the loopback health server could not start (port taken, bad address)
    ├── StateDirError        the state directory cannot be made private (exit 78, EX_CONFIG)
    ├── DaemonUnreachable    a CLI command found no daemon answering on the health address
    ├── ContainerRuntimeError    the container engine failed or refused (agent.runtime)
    │   ├── RuntimeUnavailable       the engine does not answer (daemon down, socket missing)
    │   ├── ImageRefInvalid          an image reference or digest that cannot be parsed
    │   ├── ImageNotFound            the image is not in the engine's local store
    │   ├── ImageDigestMismatch      a local image for the ref lacks the pinned digest
    │   ├── ImagePullFailed          a pull failed or did not finish in time
    │   ├── ContainerCreateError     the job container could not be created
    │   │   ├── InvalidContainerSpec     the spec breaks a rule (root user, reserved env, …)
    │   │   ├── GpuUnsupported           GPUs requested, the engine has no NVIDIA support
    │   │   ├── ContainerExists          a container with the job's name exists already
    │   │   └── IsolationMismatch        read back, it differs from docs/runtime.md: removed
    │   ├── ContainerStartError      the engine would not start it (OCI runtime, GPU driver)
    │   ├── ContainerNotFound        no container with that id
    │   └── WaitTimeout              wait() gave up; the container is still running
    ├── ModelError           a job's model artifact could not be provided (agent.models)
    │   ├── ModelUnavailable         not delivered: unknown artifact, timeout, too large
    │   │   └── ModelArchiveUnsafe       the archive breaks the safe-unpack rules, or is unreadable
    │   ├── ModelChecksumMismatch    size or sha256 differ from the assignment or artifact.end
    │   └── ModelStorageError        the spool or cache could not be written (disk full, …)
    │
    │   Defined beside the code that raises them:
    ├── TokenFileError       agent.token_file: the token file is unusable (never quotes it)
    ├── TlsSettingError      agent.tls: ca_file / client_cert / client_key cannot be used
    ├── StoreError           agent.jobs.store: the job store cannot be opened or written
    ├── AuditError           agent.audit: the ledger cannot be opened, read or appended
    ├── ResultError          agent.results.scan: the output cannot be sent (``reason``)
    │   ├── ResultInvalid            a link, device, FIFO, socket or bad name
    │   └── ResultTooLarge           over results.max_bytes / max_files
    ├── SpoolFull            agent.results.delivery: no space to spool (``no_space``)
    ├── UploadFailed         agent.results.uploader: rejected three times (``agent_error``)
    └── ControlPlaneError    agent.controlplane: the reference control plane's own errors

An error that knows the job failure reason of docs/protocol.md §4 carries it as ``reason``;
the job runner reports any other as ``agent_error``.

Error messages never contain the control-plane token, nor registry credentials.
Model errors name the artifact and what differed, never a host path; the job manager
sends only their reason code (see :attr:`ModelError.reason`).
"""

from __future__ import annotations

import errno


class AgentError(Exception):
    """Root of every error the agent raises on purpose."""


class ConfigError(AgentError):
    """The configuration cannot be used.

    ``problems`` holds every problem found, each a line of the form
    ``dotted.key[0].path: what is wrong``, so that a person can fix them all at once.
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems) if self.problems else "invalid configuration")


class GpuError(AgentError):
    """The GPU backend failed in a way that the caller has to handle."""


class HealthServerError(AgentError):
    """The health server could not be started."""


class StateDirError(AgentError):
    """The state directory exists but cannot be made the agent's alone (mode 0700).

    Raised at start: it is not owned by the agent's user, ``chmod`` fails, or it is
    read-only to the agent (under systemd: no ``ReadWritePaths=``). The message names
    the directory and says why.
    """


class DaemonUnreachable(AgentError):
    """No daemon answered on the configured health address."""


class ContainerRuntimeError(AgentError):
    """The container engine failed, or refused what the agent asked of it."""


class RuntimeUnavailable(ContainerRuntimeError):
    """The engine does not answer: the daemon is down or its socket is missing."""


class ImageRefInvalid(ContainerRuntimeError):
    """An image reference or digest that cannot be parsed."""


class ImageNotFound(ContainerRuntimeError):
    """The image is not in the engine's local store (nothing is ever pulled implicitly)."""


class ImageDigestMismatch(ContainerRuntimeError):
    """A local image exists for the reference but does not carry the pinned digest."""


class ImagePullFailed(ContainerRuntimeError):
    """A pull failed (registry unreachable, refused, unknown image) or ran out of time."""


class ContainerCreateError(ContainerRuntimeError):
    """The job container could not be created; nothing of it is left behind."""


class InvalidContainerSpec(ContainerCreateError):
    """The container spec breaks a rule; ``problems`` lists each, in words."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid container spec: " + "; ".join(self.problems))


class GpuUnsupported(ContainerCreateError):
    """GPUs were requested but the engine has no NVIDIA runtime or CDI spec."""


class ContainerExists(ContainerCreateError):
    """A container with the job's name exists already (left by an earlier attempt)."""


class IsolationMismatch(ContainerCreateError):
    """Read back from the engine, the container differs from docs/runtime.md.

    The container has been removed without being started. ``problems`` lists every
    difference, in words.
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("container isolation differs from the spec: " + "; ".join(self.problems))


class ContainerStartError(ContainerRuntimeError):
    """The engine would not start the container (OCI runtime error, GPU driver missing)."""


class ContainerNotFound(ContainerRuntimeError):
    """The engine has no container with that id."""


class WaitTimeout(ContainerRuntimeError):
    """``wait`` gave up after its timeout; the container is still running."""


class ModelError(AgentError):
    """A job's model artifact could not be provided; the job ends ``failed``.

    :attr:`reason` is the docs/protocol.md §4 failure reason the job manager reports.
    """

    reason: str = "model_unavailable"


class ModelUnavailable(ModelError):
    """The artifact was not delivered: unknown to the control plane, not in time, or
    larger than the node's model cache allows."""


class ModelArchiveUnsafe(ModelUnavailable):
    """The verified archive cannot be unpacked safely (an absolute path, ``..``, a link,
    a device or FIFO, over the size or member caps) or is not a readable tar archive.

    Reported as ``model_unavailable``: the bytes are exactly what the control plane
    meant to send (their sha256 matched), but this node will not use them.
    """


class ModelChecksumMismatch(ModelError):
    """The artifact's size or sha256 differ from the assignment's ``model`` or from
    ``artifact.end`` (which must agree with the assignment)."""

    reason = "model_checksum_mismatch"


class ModelStorageError(ModelError):
    """The spool or the model cache could not be written or read (disk full, permissions).

    :attr:`reason` is ``no_space`` when the disk is full, else ``agent_error``.
    """

    def __init__(self, message: str, errno_: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno_
        self.reason = "no_space" if errno_ in (errno.ENOSPC, errno.EDQUOT) else "agent_error"
