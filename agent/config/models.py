"""The configuration's typed, frozen models and their validation rules (see the package)."""

from __future__ import annotations

import ipaddress
import os
import socket
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

from agent import tls
from agent.airlock.settings import ReviewCommand
from agent.token_file import token_file_problems

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
# Paths come from YAML as strings; strict mode would refuse them, so paths alone coerce.
FsPath = Annotated[Path, Field(strict=False)]


class _Section(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


def _problem(kind: str, message: str, **ctx: Any) -> PydanticCustomError:
    return PydanticCustomError(kind, message, ctx)


def _problems(messages: list[str]) -> PydanticCustomError:
    """Several problems with one key, each reported on its own line with the key."""
    return PydanticCustomError(
        "several_problems", "{joined}", {"joined": "; ".join(messages), "problems": messages}
    )


def _collect(found: list[str], check: Callable[[], object]) -> None:
    try:
        check()
    except PydanticCustomError as exc:
        found.append(exc.message())


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and any loopback IPv4/IPv6 literal; never resolves DNS."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def split_host_port(listen: str) -> tuple[str, int]:
    """Split ``host:port`` or ``[v6]:port``. Raises ``ValueError`` with a reason."""
    host, sep, port_text = listen.rpartition(":")
    if not sep or not host:
        raise ValueError("must be HOST:PORT, e.g. 127.0.0.1:8787")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError("an IPv6 address must be written in brackets, e.g. [::1]:8787")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"port {port_text!r} is not a number from 1 to 65535")
    return host, int(port_text)


class NodeConfig(_Section):
    id: str = Field(default_factory=socket.gethostname, pattern=r"^[A-Za-z0-9._-]{1,128}$")
    labels: dict[str, str] = Field(default_factory=dict)


class ReconnectConfig(_Section):
    initial_s: PositiveFloat = 1.0
    max_s: PositiveFloat = 60.0

    @field_validator("max_s")
    @classmethod
    def _max_not_below_initial(cls, value: float, info: ValidationInfo) -> float:
        initial = info.data.get("initial_s")
        if initial is not None and value < initial:
            raise _problem(
                "backoff_order", "must be at least initial_s ({initial})", initial=initial
            )
        return value


def _require_private_file(path: Path, what: str) -> Path:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise _problem("file_missing", "{path} does not exist", path=str(path)) from None
    except OSError as exc:
        raise _problem(
            "file_unreadable", "{path} cannot be read: {why}", path=str(path), why=exc.strerror
        ) from None
    if not stat.S_ISREG(st.st_mode):
        raise _problem("not_a_file", "{path} is not a regular file", path=str(path))
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise _problem(
            "file_too_open",
            "{path} is accessible by group or others (mode {mode}); the {what} must be "
            "readable by its owner only: chmod 600 {path}",
            path=str(path),
            mode=f"{mode:04o}",
            what=what,
        )
    return path


class ControlPlaneConfig(_Section):
    # Declared in this order so that each validator sees the fields it depends on.
    allow_insecure: bool = False
    url: str
    token_file: FsPath = Path("/etc/cloudbender-agent/token")
    ca_file: FsPath | None = None
    client_cert: FsPath | None = None
    # Validated even when absent: client_cert alone must then hold the key.
    client_key: FsPath | None = Field(default=None, validate_default=True)
    reconnect: ReconnectConfig = Field(default_factory=ReconnectConfig)

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str, info: ValidationInfo) -> str:
        parts = urlsplit(value)  # the scheme comes back lower-case: WSS:// is wss://
        if parts.scheme not in ("ws", "wss"):
            raise _problem("url_scheme", "must start with wss:// (or ws:// for loopback)")
        if not parts.hostname:
            raise _problem("url_host", "has no host")
        if (
            parts.scheme == "ws"
            and not is_loopback_host(parts.hostname)
            and not info.data.get("allow_insecure", False)
        ):
            raise _problem(
                "insecure_url",
                "ws:// to {host} sends the token unencrypted; use wss:// or set "
                "control_plane.allow_insecure: true",
                host=parts.hostname,
            )
        return value

    @field_validator("token_file")
    @classmethod
    def _check_token_file(cls, value: Path) -> Path:
        problems = token_file_problems(value)
        if problems:
            raise _problems([str(problem) for problem in problems])
        return value

    @field_validator("ca_file")
    @classmethod
    def _check_ca_file(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is not None:
            _require_wss("ca_file", info)
            _require_file(value)
            _tls_check(tls.check_ca_file, value)
        return value

    @field_validator("client_cert")
    @classmethod
    def _check_client_cert(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is not None:
            _require_wss("client_cert", info)
            _require_file(value)
            _tls_check(tls.check_client_cert, value)
        return value

    @field_validator("client_key")
    @classmethod
    def _check_client_key(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        # A key readable by others that also does not match is two fixes: both are said.
        found: list[str] = []
        if value is not None:
            _require_wss("client_key", info)
            _collect(found, lambda: _require_private_file(value, "client key"))
        if "client_cert" in info.data:  # else client_cert is invalid, and reported as such
            cert = info.data["client_cert"]
            if cert is None and value is not None:
                found.append(
                    "is set without control_plane.client_cert (a PEM holding both the "
                    "certificate and the key may be given as client_cert alone)"
                )
            elif cert is not None:
                _collect(found, lambda: _tls_check(lambda p: tls.check_key_pair(p, value), cert))
        if found:
            raise _problems(found)
        return value

    @property
    def scheme(self) -> str:
        """``ws`` or ``wss``, lower-case whatever the URL's spelling."""
        return urlsplit(self.url).scheme


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise _problem("file_missing", "{path} does not exist", path=str(path))


def _require_wss(key: str, info: ValidationInfo) -> None:
    url = info.data.get("url")
    if url is not None and urlsplit(url).scheme == "ws":
        raise _problem(
            "tls_without_wss",
            "is set, but control_plane.url is ws://: TLS settings apply to wss:// only; "
            "remove {key} or use wss://",
            key=key,
        )


def _tls_check(check: Callable[[Path], None], path: Path) -> None:
    try:
        check(path)
    except tls.TlsSettingError as exc:
        raise _problem("tls_setting", "{why}", why=exc.words) from None


class RuntimeConfig(_Section):
    engine: Literal["docker"] = "docker"
    docker_host: str = "unix:///var/run/docker.sock"
    allowed_images: tuple[str, ...] = ()
    require_digest: bool = False
    pull: bool = True
    job_user: str = Field(default="65534:65534", pattern=r"^[0-9]+:[0-9]+$")
    stop_grace_s: PositiveInt = 30

    @field_validator("allowed_images", mode="before")
    @classmethod
    def _list_to_tuple(cls, value: object) -> object:
        return tuple(value) if isinstance(value, list) else value

    @field_validator("job_user")
    @classmethod
    def _not_root(cls, value: str) -> str:
        if value.split(":")[0] == "0":
            raise _problem("job_user_root", "job containers must not run as root (uid 0)")
        return value


class GpusConfig(_Section):
    allow: Literal["all"] | tuple[int | str, ...] = "all"

    @field_validator("allow", mode="before")
    @classmethod
    def _list_to_tuple(cls, value: object) -> object:
        return tuple(value) if isinstance(value, list) else value


class DatastoreConfig(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")
    path: FsPath
    description: str = ""

    @field_validator("path")
    @classmethod
    def _check_path(cls, value: Path) -> Path:
        if not value.is_absolute():
            raise _problem("path_relative", "{path} is not an absolute path", path=str(value))
        if not value.exists():
            # The unit's ProtectHome=true: a datastore there exists for check-config in
            # a shell, yet not for the service, which only sees it missing.
            hidden = any(Path(os.path.normpath(value)).is_relative_to(d) for d in _PROTECT_HOME)
            why = _PROTECT_HOME_HINT if hidden else ""
            raise _problem("path_missing", "{path} does not exist" + why, path=str(value))
        if not value.is_dir():
            raise _problem("path_not_dir", "{path} is not a directory", path=str(value))
        return value


_PROTECT_HOME = (Path("/home"), Path("/root"), Path("/run/user"))
_PROTECT_HOME_HINT = (
    " (under systemd, ProtectHome=true hides /home, /root and /run/user: move the "
    "datastore, or see docs/systemd.md)"
)


class LimitsConfig(_Section):
    # Lower bounds: to Docker a CPU, memory, pids or /tmp size limit of 0 (or -1) is
    # no limit at all, so every cap here must become a real, positive one. max_cpus
    # 0.01 is docs/protocol.md 1.1's minimum (NanoCpus 10,000,000; less rounds towards 0);
    # max_memory_mib 6 is the smallest memory limit Docker accepts.
    max_concurrent_jobs: PositiveInt = 2
    max_timeout_s: PositiveInt = 86400
    max_cpus: Annotated[float, Field(ge=0.01)] = 16
    max_memory_mib: Annotated[int, Field(ge=6)] = 65536
    pids: PositiveInt = 1024
    tmp_mib: PositiveInt = 1024
    # /dev/shm per job (Docker's 64 MiB breaks NCCL across GPUs; counts as job memory).
    shm_mib: PositiveInt = 1024
    # New jobs are refused no_space under this much free space in the state directory.
    min_free_mib: NonNegativeInt = 2048


class ResultsConfig(_Section):
    max_bytes: PositiveInt = 1024**3
    max_files: PositiveInt = 10000
    retention_h: PositiveFloat = 24
    review: Literal["none", "manual"] = "none"  # the airlock: docs/airlock.md
    review_command: ReviewCommand = None
    review_timeout_h: PositiveFloat = 72
    review_approvals: Annotated[int, Field(ge=1, le=5)] = 1


class ModelsConfig(_Section):
    cache_max_mib: PositiveInt = 51200


# A Unix socket's path must fit sockaddr_un.sun_path (108 bytes, with the final NUL).
MAX_SOCKET_PATH = 107


class ControlConfig(_Section):
    """The operator's control socket (``drain``, ``cancel``...): root and ``group`` only."""

    socket: FsPath = Path("/run/cloudbender-agent/control.sock")
    group: str = Field(default="cloudbender-admin", pattern=r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")

    @field_validator("socket")
    @classmethod
    def _check_socket(cls, value: Path) -> Path:
        if not value.is_absolute():
            raise _problem("socket_relative", "must be an absolute path, not {path}", path=value)
        if len(os.fsencode(value)) > MAX_SOCKET_PATH:
            raise _problem(
                "socket_too_long",
                "{path} is longer than the {n} bytes a Unix socket path may have",
                path=value,
                n=MAX_SOCKET_PATH,
            )
        return value


class HealthConfig(_Section):
    # Declared before ``listen`` so that the listen validator can see it.
    allow_remote: bool = False
    listen: str = "127.0.0.1:8787"
    max_disconnected_s: PositiveFloat = 600

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str, info: ValidationInfo) -> str:
        try:
            host, _ = split_host_port(value)
        except ValueError as exc:
            raise _problem("listen_format", "{why}", why=str(exc)) from None
        if not is_loopback_host(host) and not info.data.get("allow_remote", False):
            raise _problem(
                "listen_remote",
                "{host} is not a loopback address; the health server is for this machine "
                "only unless health.allow_remote: true",
                host=host,
            )
        return value

    @property
    def address(self) -> tuple[str, int]:
        return split_host_port(self.listen)


class LoggingConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console"] = "json"
    # The tail of each job's own stdout/stderr kept on the node for `logs JOB` (KiB).
    job_log_tail_kib: int = Field(default=64, ge=0, le=2048)


class Config(_Section):
    """The whole agent configuration. Frozen: reloads build a new one."""

    node: NodeConfig = Field(default_factory=NodeConfig)
    control_plane: ControlPlaneConfig | None = None
    state_dir: FsPath = Path("/var/lib/cloudbender-agent")
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    gpus: GpusConfig = Field(default_factory=GpusConfig)
    datastores: tuple[DatastoreConfig, ...] = ()
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    results: ResultsConfig = Field(default_factory=ResultsConfig)
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    control: ControlConfig = Field(default_factory=ControlConfig)
    health: HealthConfig = Field(default_factory=HealthConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @field_validator("datastores", mode="before")
    @classmethod
    def _list_to_tuple(cls, value: object) -> object:
        return tuple(value) if isinstance(value, list) else value
