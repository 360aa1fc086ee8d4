"""The Docker implementation of :class:`agent.runtime.base.Runtime`.

The only module that imports ``docker``. Every method blocks (the SDK does): the job
manager calls them through ``asyncio.to_thread``. The class is thread-safe: the SDK
client is shared (requests' connection pool), except for ``wait`` and ``pull``,
which hold a connection for minutes and get one of their own.

Nothing here pulls implicitly: ``create`` takes a local image id, and the only pull
is :meth:`DockerRuntime.pull`. SDK and HTTP errors are turned into the agent's
(``agent.errors.ContainerRuntimeError`` and below) with the engine's own words.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import docker
import requests
import structlog
from docker.errors import APIError, DockerException, NotFound

from agent.errors import (
    ContainerCreateError,
    ContainerExists,
    ContainerNotFound,
    ContainerRuntimeError,
    ContainerStartError,
    GpuUnsupported,
    ImageDigestMismatch,
    ImageNotFound,
    ImagePullFailed,
    IsolationMismatch,
    RuntimeUnavailable,
    WaitTimeout,
)
from agent.runtime.base import (
    LABEL_MANAGED,
    LABEL_NODE_ID,
    ContainerSpec,
    ContainerState,
    Runtime,
    RuntimeInfo,
)
from agent.runtime.gpucheck import access_problems, container_access, driver_minors
from agent.runtime.gpupath import GpuPath, probe_gpu_path
from agent.runtime.images import parse_ref, pinned_digest, repo_digests, scrub
from agent.runtime.pull import is_read_timeout, stream_pull
from agent.runtime.spec import create_kwargs
from agent.runtime.verify import isolation_summary, verify_attrs

log = structlog.get_logger(__name__)

_AUTH_KEYS = ("username", "password", "auth", "identitytoken", "registrytoken", "serveraddress")


def _why(exc: BaseException) -> str:
    if isinstance(exc, APIError) and exc.explanation:
        return str(exc.explanation)
    return str(exc) or type(exc).__name__


@contextmanager
def _engine(what: str) -> Iterator[None]:
    """Map what escapes a method's own handling to the agent's errors."""
    try:
        yield
    except ContainerRuntimeError:
        raise
    except NotFound as exc:
        raise ContainerNotFound(f"{what}: {_why(exc)}") from exc
    except DockerException as exc:  # APIError is also a requests exception: first
        raise ContainerRuntimeError(f"{what}: {_why(exc)}") from exc
    except requests.exceptions.RequestException as exc:
        raise RuntimeUnavailable(f"{what}: the Docker engine does not answer: {exc}") from exc


class DockerRuntime:
    """Job containers on one Docker engine (``docker_host``, e.g. ``unix:///var/run/docker.sock``).

    Construction never contacts the engine; the first call does, and a call made
    while the engine is down raises :class:`~agent.errors.RuntimeUnavailable`
    (``info`` reports it instead). ``timeout_s`` bounds each ordinary engine call.
    ``cdi_dirs`` overrides the engine's CDI spec dirs (tests); ``gpu_minors`` maps GPU
    UUIDs to device minors for the check after start (default: the driver's, see
    ``agent.runtime.gpucheck``).
    """

    def __init__(
        self,
        docker_host: str,
        *,
        timeout_s: float = 60,
        cdi_dirs: Sequence[Path] | None = None,
        gpu_minors: Callable[[], Mapping[str, int]] = driver_minors,
    ) -> None:
        self._host = docker_host
        self._timeout = max(1, math.ceil(timeout_s))
        self._cdi_dirs = tuple(cdi_dirs) if cdi_dirs is not None else None
        self._gpu_minors = gpu_minors
        self._lock = threading.Lock()
        self._docker: docker.DockerClient | None = None
        self._runtimes: frozenset[str] | None = None
        self._gpu: GpuPath | None = None

    def _client(self) -> docker.DockerClient:
        with self._lock:
            if self._docker is None:
                try:
                    self._docker = docker.DockerClient(base_url=self._host, timeout=self._timeout)
                except DockerException as exc:
                    raise RuntimeUnavailable(
                        f"the Docker engine at {self._host} does not answer: {_why(exc)}"
                    ) from exc
            return self._docker

    def _own_api(self) -> docker.APIClient:
        # A connection of its own for a call that blocks for long (wait, pull), which
        # passes its own timeout; the version is known, so this asks the engine nothing.
        version = self._client().api.api_version
        return docker.APIClient(base_url=self._host, version=version, timeout=self._timeout)

    def _engine_facts(self, refresh: bool = False) -> tuple[frozenset[str], GpuPath]:
        """The engine's runtimes and GPU path, asked once (again on ``refresh``)."""
        if refresh or self._runtimes is None or self._gpu is None:
            with _engine("reading the engine's info"):
                engine_info = self._client().info()
            runtimes = frozenset(engine_info.get("Runtimes") or ())
            gpu = probe_gpu_path(engine_info, cdi_dirs=self._cdi_dirs)
            if gpu != self._gpu:
                log.info("runtime_gpu_path", gpu_path=gpu.kind, why=gpu.why)
            self._runtimes, self._gpu = runtimes, gpu
        return self._runtimes, self._gpu

    def info(self) -> RuntimeInfo:
        try:
            with _engine("asking the engine's version"):
                version = self._client().version().get("Version")
            _, gpu = self._engine_facts()
        except Exception as exc:  # the contract: never raises
            return RuntimeInfo("docker", None, False, False, self._unanswered(exc))
        return RuntimeInfo("docker", version, gpu.usable, True, None, gpu.kind, gpu.why)

    def _unanswered(self, exc: BaseException) -> str:
        # What /healthz and the engine_down line say: the socket in words, not the HTTP
        # library's nested repr (that goes to the debug log).
        log.debug("engine_call_failed", engine=self._host, error=str(exc))
        if isinstance(exc, RuntimeUnavailable):
            return f"the Docker engine does not answer on {self._host}"
        return f"the Docker engine on {self._host} answered with an error: {exc}"

    def kill_signals(self, container_id: str, since: datetime | None) -> list[str]:
        """The signals the engine sent the container since ``since`` (its ``kill``
        events, oldest first): ``docker stop``/``kill``, and the engine's own SIGTERM
        then SIGKILL when it shuts down. A job that ends by itself has none. From the
        engine's recent-events buffer, lost when the engine restarts. Raises
        :class:`~agent.errors.RuntimeUnavailable`."""
        until = datetime.now(UTC)
        with _engine(f"reading the events of container {container_id[:12]}"):
            events = self._client().api.events(
                since=since or until,
                until=until,
                filters={"container": container_id, "event": "kill"},
                decode=True,
            )
            found = [e for e in events if isinstance(e, dict)]
        return [str((e.get("Actor") or {}).get("Attributes", {}).get("signal", "?")) for e in found]

    def create(self, spec: ContainerSpec) -> str:
        runtimes, gpu = self._engine_facts()
        if spec.runtime not in runtimes:
            runtimes, gpu = self._engine_facts(refresh=True)
            if spec.runtime not in runtimes:
                raise ContainerCreateError(
                    f"job {spec.job_id}: runtime {spec.runtime!r} is not configured in the "
                    f"Docker engine (it has {', '.join(sorted(runtimes))})"
                )
        if spec.gpu_uuids and gpu.kind is None:
            raise GpuUnsupported(
                f"job {spec.job_id} needs GPUs, but the engine {gpu.describe()} "
                "(set up the NVIDIA container toolkit as docs/gpus.md says)"
            )
        kwargs = create_kwargs(spec, gpu.kind or "legacy")
        what = f"creating the container of job {spec.job_id}"
        with _engine(what):
            try:
                container = self._client().containers.create(**kwargs)
            except docker.errors.ImageNotFound as exc:
                raise ImageNotFound(f"{what}: image {spec.image_id} is not local") from exc
            except APIError as exc:
                if exc.status_code == 409:
                    raise ContainerExists(f"{what}: {_why(exc)}") from exc
                raise ContainerCreateError(f"{what}: {_why(exc)}") from exc
        cid = str(container.id)
        try:
            with _engine(f"reading back the container of job {spec.job_id}"):
                attrs = self._client().api.inspect_container(cid)
            problems = verify_attrs(spec, attrs)
            if problems:
                raise IsolationMismatch(problems)
        except BaseException:
            # Never leave a container that was not verified; the first error is the news.
            try:
                self.remove(cid)
            except ContainerRuntimeError as exc:
                log.error("container_remove_failed", container=cid[:12], error=str(exc))
            raise
        log.info("container_created", job_id=spec.job_id, container=cid[:12], image=spec.image)
        return cid

    def start(self, container_id: str) -> None:
        with _engine(f"starting container {container_id[:12]}"):
            try:
                self._client().api.start(container_id)
            except APIError as exc:
                if isinstance(exc, NotFound):
                    raise
                raise ContainerStartError(
                    f"starting container {container_id[:12]}: {_why(exc)}"
                ) from exc
        self._check_gpus(container_id)

    def _check_gpus(self, container_id: str) -> None:
        """Kill the container and raise :class:`~agent.errors.ContainerStartError` unless
        it can open exactly its leased GPUs (``NVIDIA_VISIBLE_DEVICES``, which the
        read-back checked against the lease), before a job can run on the CPU unnoticed."""
        attrs = self._attrs(container_id)
        env = dict(
            e.split("=", 1) for e in (attrs.get("Config") or {}).get("Env") or [] if "=" in e
        )
        leased = [u for u in env.get("NVIDIA_VISIBLE_DEVICES", "").split(",") if u and u != "void"]
        pid = int((attrs.get("State") or {}).get("Pid") or 0)
        access = container_access(pid) if pid > 0 else None
        if access is not None and not self._still_runs(container_id, pid):
            # It ended while being read: what was read may be the root cgroup's list (its
            # own is gone) or another process's that took the pid. It ran already.
            access = None
        if access is None:  # exited already, or cgroup v2 without access to its /dev
            if leased:
                log.warning("gpu_devices_unverified", container=container_id[:12], gpus=leased)
            return
        problems = access_problems(leased, self._gpu_minors(), access)
        if not problems:
            return
        with _engine(f"killing container {container_id[:12]}"):
            try:
                self._client().api.kill(container_id)
            except APIError as exc:
                if exc.status_code != 409:  # 409: not running any more
                    raise
        raise ContainerStartError(
            f"container {container_id[:12]} did not get exactly its leased GPUs: "
            + "; ".join(problems)
        )

    def _still_runs(self, container_id: str, pid: int) -> bool:
        state = self._attrs(container_id).get("State") or {}
        return bool(state.get("Running")) and int(state.get("Pid") or 0) == pid

    def wait(self, container_id: str, timeout_s: float | None) -> ContainerState:
        api = self._own_api()
        try:
            with _engine(f"waiting for container {container_id[:12]}"):
                try:
                    api.wait(container_id, timeout=_whole_seconds(timeout_s))
                except requests.exceptions.RequestException as exc:
                    if not is_read_timeout(exc):
                        raise
                    raise WaitTimeout(
                        f"container {container_id[:12]} still runs after {timeout_s:g} s"
                    ) from exc
        finally:
            api.close()
        state = self.inspect(container_id)
        if state is None:
            raise ContainerNotFound(f"container {container_id[:12]} vanished when it stopped")
        return state

    def stop(self, container_id: str, grace_s: float) -> None:
        with _engine(f"stopping container {container_id[:12]}"):
            self._client().api.stop(container_id, timeout=max(0, math.ceil(grace_s)))

    def remove(self, container_id: str) -> None:
        with _engine(f"removing container {container_id[:12]}"):
            try:
                self._client().api.remove_container(container_id, force=True, v=True)
            except NotFound:
                return
            except APIError as exc:
                if exc.status_code == 409 and "in progress" in _why(exc):
                    return
                raise

    def _attrs(self, container_id: str) -> dict[str, Any]:
        with _engine(f"inspecting container {container_id[:12]}"):
            attrs: dict[str, Any] = self._client().api.inspect_container(container_id)
            return attrs

    def inspect(self, container_id: str) -> ContainerState | None:
        try:
            return ContainerState.from_inspect(self._attrs(container_id))
        except ContainerNotFound:
            return None

    def list_jobs(self, node_id: str) -> list[ContainerState]:
        labels = [f"{LABEL_MANAGED}=true", f"{LABEL_NODE_ID}={node_id}"]
        with _engine(f"listing the job containers of node {node_id}"):
            found = self._client().api.containers(all=True, filters={"label": labels})
        states = (self.inspect(str(c["Id"])) for c in found)
        return [s for s in states if s is not None]  # removed in between: gone

    def logs(self, container_id: str, max_bytes: int) -> bytes:
        with _engine(f"reading the logs of container {container_id[:12]}"):
            # Every line is at least one byte, so the last max_bytes lines hold the last
            # max_bytes bytes; the engine keeps at most 2 x 1 MiB anyway (spec.LOG_OPTS).
            data = self._client().api.logs(
                container_id, stdout=True, stderr=True, tail=max(max_bytes, 1), stream=False
            )
        return bytes(data)[-max_bytes:] if max_bytes > 0 else b""

    def applied_isolation(self, container_id: str) -> dict[str, Any]:
        return isolation_summary(self._attrs(container_id))

    def _image_attrs(self, name: str) -> dict[str, Any] | None:
        with _engine(f"looking up image {name}"):
            try:
                api: Any = self._client().api  # inspect_image is untyped in the stubs
                attrs: dict[str, Any] = api.inspect_image(name)
            except NotFound:
                return None
            return attrs

    def image_id(self, ref: str, digest: str | None) -> str | None:
        parsed = parse_ref(ref)
        want = pinned_digest(parsed, digest)
        if want is None:
            attrs = self._image_attrs(ref)
            return None if attrs is None else str(attrs["Id"])
        attrs = self._image_attrs(f"{parsed.repo}@{want}")
        if attrs is not None and want in repo_digests(attrs):
            return str(attrs["Id"])
        if parsed.digest is not None and parsed.tag is None:
            return None
        attrs = self._image_attrs(parsed.by_tag)
        if attrs is None:
            return None
        if want in repo_digests(attrs):
            return str(attrs["Id"])
        have = ", ".join(sorted(repo_digests(attrs))) or "no registry digest (built locally?)"
        raise ImageDigestMismatch(
            f"local image {parsed.by_tag} ({str(attrs['Id'])[:19]}) has {have}, "
            f"but the job pins {want}"
        )

    def pull(
        self, ref: str, digest: str | None, auth: Mapping[str, str] | None, timeout_s: float
    ) -> str:
        parsed = parse_ref(ref)
        want = pinned_digest(parsed, digest)
        creds = {k: v for k, v in (auth or {}).items() if k in _AUTH_KEYS and v}
        secrets = [v for k, v in creds.items() if k not in ("username", "serveraddress")]
        api = self._own_api()
        url = f"{api.base_url}/v{api.api_version}/images/create"
        log.info("image_pull_started", image=ref, digest=want, timeout_s=timeout_s)
        started = time.monotonic()
        try:
            stream_pull(api, url, parsed.repo, want or parsed.tag or "latest", creds, timeout_s)
        except ImagePullFailed as exc:
            message = scrub(str(exc), secrets)
            log.warning("image_pull_failed", image=ref, error=message)
            # Not chained: the cause's text may hold what was just scrubbed.
            raise ImagePullFailed(f"pulling {ref}: {message}") from None
        finally:
            api.close()
        image = self.image_id(ref, want)
        if image is None:
            raise ImagePullFailed(f"pulling {ref}: the engine reports success but has no image")
        took_s = round(time.monotonic() - started, 1)
        log.info("image_pulled", image=ref, image_id=image, took_s=took_s)
        return image


def _whole_seconds(timeout_s: float | None) -> int | None:
    # The SDK's stubs want whole seconds; rounding up never waits less than asked.
    return None if timeout_s is None else max(1, math.ceil(timeout_s))


def _implements_runtime(runtime: DockerRuntime) -> Runtime:
    return runtime  # mypy checks here that DockerRuntime has every method of Runtime
