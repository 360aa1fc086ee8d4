"""A behaving fake of :class:`agent.runtime.base.Runtime`, for tests without an engine.

Like nomad's ``drivers/mock``: it keeps real state and behaves as the Docker runtime
does where the agent could notice the difference (tests/contract holds the proof,
one suite run against both). Two parts, as with a real engine:

- :class:`FakeEngine` is the engine: its containers, images, clock and whether it
  answers. It outlives agents, so a test "restarts the agent" by building a new
  :class:`FakeRuntime` (a new client) on the same engine; ``list_jobs`` then sees
  what a real engine would.
- :class:`FakeRuntime` is the client the agent holds, with the interface's contract.

What each job does is set per job id (the ``cloudbender.job-id`` label, which the real
runtime keys containers by), before or after it is assigned::

    engine = FakeEngine()
    engine.behave("j-1", run_s=30, exit_code=3, outputs={"out.txt": b"hi"})
    engine.behave("j-2", start_error="nvidia-container-cli: driver not loaded")
    engine.behave("j-3", oom=True)          # killed by the kernel: 137, OOMKilled
    engine.behave("j-4", run_s=None)        # runs until stopped or engine.exit("j-4", 0)
    engine.advance(30)                      # the engine's clock: j-1 exits 3 now
    engine.down(); engine.up()              # every call raises RuntimeUnavailable between

Time is the engine's clock, moved only by :meth:`FakeEngine.advance`: a container
with ``run_s`` exits when the clock reaches its start plus ``run_s`` (``run_s=0``, the
default, exits as it starts). Nothing in it sleeps; ``wait`` blocks on a condition
until the container stops or its timeout passes (real seconds, as the engine's own
wait does: that is the interface, not synchronisation).

Outputs are written into the spec's ``output_dir`` when the container exits by itself
(as a job writes its results before it ends), never when it is stopped. ``stop``
ends a job that heeds SIGTERM with 143, one with ``ignores_term`` with 137 (the engine's
SIGKILL after the grace period). While the engine is down, containers keep their state
(as with dockerd's ``live-restore``). Thread-safe: one lock guards everything.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

from agent.errors import (
    ContainerCreateError,
    ContainerExists,
    ContainerNotFound,
    ContainerStartError,
    GpuUnsupported,
    ImageNotFound,
    ImagePullFailed,
    RuntimeUnavailable,
    WaitTimeout,
)
from agent.runtime.base import (
    LABEL_NODE_ID,
    ContainerSpec,
    ContainerState,
    Runtime,
    RuntimeInfo,
)
from agent.runtime.spec import container_name, create_kwargs, expected_mounts, job_env

T = TypeVar("T")
EXIT_SIGTERM = 143
EXIT_SIGKILL = 137
# Where the fake's clock starts: any fixed UTC time, so that times are reproducible.
EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Behaviour:
    """What one job's container does. ``run_s=None``: runs until stopped or exited by
    hand (:meth:`FakeEngine.exit`). ``start_error``: ``start`` fails with these words.
    ``outputs``: relative path → bytes, written on a natural exit. ``oom``: exits 137
    with ``oom_killed``. ``ignores_term``: ``stop`` needs the SIGKILL (137)."""

    run_s: float | None = 0.0
    exit_code: int = 0
    start_error: str | None = None
    outputs: Mapping[str, bytes] = field(default_factory=dict)
    oom: bool = False
    ignores_term: bool = False
    logs: bytes = b""


@dataclass
class _Container:
    id: str
    name: str
    spec: ContainerSpec
    labels: Mapping[str, str]
    behaviour: Behaviour
    status: str = "created"
    exit_code: int | None = None
    oom_killed: bool = False
    started: float | None = None
    finished: float | None = None
    error: str | None = None

    def state(self) -> ContainerState:
        return ContainerState(
            id=self.id,
            status=self.status,
            running=self.status == "running",
            exit_code=self.exit_code,
            oom_killed=self.oom_killed,
            started_at=_time(self.started),
            finished_at=_time(self.finished),
            labels=self.labels,
            error=self.error,
        )


def _time(t: float | None) -> datetime | None:
    return None if t is None else EPOCH + timedelta(seconds=t)


class FakeEngine:
    """The engine's state; see the module docstring. ``images`` maps a local reference
    to its image id; ``registry`` what a pull can fetch. ``runtimes`` and
    ``gpu_support`` are what ``create`` checks a spec against."""

    def __init__(self, *, gpu_support: bool = False) -> None:
        self._cond = threading.Condition()
        self._containers: dict[str, _Container] = {}
        self._behaviours: dict[str, Behaviour] = {}
        self.default = Behaviour()
        self.images: dict[str, str] = {}
        self.registry: dict[str, str] = {}
        self.runtimes = frozenset({"runc"})
        self.gpu_support = gpu_support
        self._now = 0.0
        self._reachable = True
        self.calls: list[str] = []

    # -- what a test does -----------------------------------------------------------

    def behave(self, job_id: str, **fields: Any) -> None:
        """Set what the container of ``job_id`` does (fields of :class:`Behaviour`, the
        rest kept); a container made already does so from now on (a job "decides" to
        exit; a start fails because the world changed since create)."""
        with self._cond:
            behaviour = replace(self._behaviours.get(job_id, self.default), **fields)
            self._behaviours[job_id] = behaviour
            for c in self._containers.values():
                if c.spec.job_id == job_id:
                    c.behaviour = behaviour
            self._settle()

    def add_image(self, ref: str) -> str:
        """Make ``ref`` a local image; return its id."""
        image_id = "sha256:" + uuid.uuid5(uuid.NAMESPACE_URL, ref).hex * 2
        self.images[ref] = image_id
        return image_id

    def advance(self, seconds: float) -> None:
        """Move the engine's clock on; containers whose run time has passed exit."""
        with self._cond:
            self._now += seconds
            self._settle()

    def exit(self, job_id: str, exit_code: int) -> None:
        """The running container of ``job_id`` exits now with ``exit_code``."""
        self.behave(job_id, run_s=0.0, exit_code=exit_code)

    def down(self) -> None:
        """The engine stops answering: every call raises RuntimeUnavailable."""
        with self._cond:
            self._reachable = False
            self._cond.notify_all()

    def up(self) -> None:
        with self._cond:
            self._reachable = True
            self._cond.notify_all()

    def container_ids(self) -> list[str]:
        with self._cond:
            return list(self._containers)

    # -- the engine's side, for FakeRuntime; every method holds the lock -----------------

    def _settle(self) -> None:
        for c in self._containers.values():
            run_s, started = c.behaviour.run_s, c.started
            due = run_s is not None and started is not None and self._now >= started + run_s
            if c.status == "running" and due:
                self._natural_exit(c)
        self._cond.notify_all()

    def _natural_exit(self, c: _Container) -> None:
        b = c.behaviour
        for name, data in b.outputs.items():
            path = c.spec.output_dir / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        self._end(c, EXIT_SIGKILL if b.oom else b.exit_code, oom=b.oom)

    def _end(self, c: _Container, code: int, *, oom: bool = False) -> None:
        c.status, c.exit_code, c.oom_killed, c.finished = "exited", code, oom, self._now

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        with self._cond:
            self.calls.append(what)
            if not self._reachable:
                raise RuntimeUnavailable(f"{what}: the fake engine does not answer")
            return fn()

    def _get(self, container_id: str, what: str) -> _Container:
        c = self._containers.get(container_id)
        if c is None:
            raise ContainerNotFound(f"{what}: no such container {container_id[:12]}")
        return c


class FakeRuntime:
    """The agent's client of a :class:`FakeEngine`; the :class:`Runtime` contract."""

    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine

    def info(self) -> RuntimeInfo:
        e = self.engine
        try:
            return e._call("info", lambda: RuntimeInfo("fake", "1.0", e.gpu_support, True, None))
        except RuntimeUnavailable as exc:
            return RuntimeInfo("fake", None, False, False, str(exc))

    def create(self, spec: ContainerSpec) -> str:
        e = self.engine

        def create() -> str:
            kwargs = create_kwargs(spec)  # InvalidContainerSpec, as the real one
            if spec.runtime not in e.runtimes:
                raise ContainerCreateError(f"job {spec.job_id}: no runtime {spec.runtime!r}")
            if spec.gpu_uuids and not e.gpu_support:
                raise GpuUnsupported(f"job {spec.job_id} needs GPUs; the engine has none")
            if spec.image_id not in e.images.values():
                raise ImageNotFound(f"image {spec.image_id} is not local")
            name = container_name(spec.node_id, spec.job_id)
            if any(c.name == name for c in e._containers.values()):
                raise ContainerExists(f"creating {name}: the name is in use")
            cid = uuid.uuid4().hex * 2
            behaviour = e._behaviours.get(spec.job_id, e.default)
            labels = MappingProxyType(dict(kwargs["labels"]))
            e._containers[cid] = _Container(cid, name, spec, labels, behaviour)
            return cid

        return e._call("create", create)

    def start(self, container_id: str) -> None:
        e = self.engine

        def start() -> None:
            c = e._get(container_id, "starting")
            if c.status == "running":
                return
            if c.behaviour.start_error is not None:
                c.error = c.behaviour.start_error
                raise ContainerStartError(f"starting {container_id[:12]}: {c.error}")
            c.status, c.started, c.exit_code, c.finished = "running", e._now, None, None
            e._settle()

        e._call("start", start)

    def wait(self, container_id: str, timeout_s: float | None) -> ContainerState:
        e = self.engine
        deadline = None if timeout_s is None else time.monotonic() + timeout_s

        def wait() -> ContainerState:
            while True:
                c = e._get(container_id, "waiting")
                # As the engine's wait ("not-running"): a created container returns too.
                if c.status != "running":
                    return c.state()
                if not e._reachable:
                    raise RuntimeUnavailable(f"waiting for {container_id[:12]}: engine down")
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise WaitTimeout(f"container {container_id[:12]} still runs")
                e._cond.wait(left)

        return e._call("wait", wait)

    def stop(self, container_id: str, grace_s: float) -> None:
        e = self.engine

        def stop() -> None:
            c = e._get(container_id, "stopping")
            if c.status == "running":
                ignores = c.behaviour.ignores_term
                e._end(c, EXIT_SIGKILL if ignores else EXIT_SIGTERM)
                e._cond.notify_all()

        e._call("stop", stop)

    def remove(self, container_id: str) -> None:
        e = self.engine

        def remove() -> None:
            if e._containers.pop(container_id, None) is not None:
                e._cond.notify_all()  # a waiter on it learns it is gone

        e._call("remove", remove)

    def inspect(self, container_id: str) -> ContainerState | None:
        e = self.engine
        return e._call(
            "inspect", lambda: c.state() if (c := e._containers.get(container_id)) else None
        )

    def list_jobs(self, node_id: str) -> list[ContainerState]:
        e = self.engine
        return e._call(
            "list_jobs",
            lambda: [
                c.state() for c in e._containers.values() if c.labels.get(LABEL_NODE_ID) == node_id
            ],
        )

    def image_id(self, ref: str, digest: str | None) -> str | None:
        return self.engine._call("image_id", lambda: self.engine.images.get(ref))

    def pull(
        self, ref: str, digest: str | None, auth: Mapping[str, str] | None, timeout_s: float
    ) -> str:
        e = self.engine

        def pull() -> str:
            if ref not in e.registry:
                raise ImagePullFailed(f"pulling {ref}: not in the fake registry")
            e.images[ref] = e.registry[ref]
            return e.images[ref]

        return e._call("pull", pull)

    def logs(self, container_id: str, max_bytes: int) -> bytes:
        e = self.engine
        data = e._call("logs", lambda: e._get(container_id, "logs").behaviour.logs)
        return data[-max_bytes:] if max_bytes > 0 else b""

    def applied_isolation(self, container_id: str) -> dict[str, Any]:
        e = self.engine

        def summary() -> dict[str, Any]:
            spec = e._get(container_id, "inspecting").spec
            return {
                "image_id": spec.image_id,
                "user": spec.user,
                "networks": ["none"],
                "mounts": [
                    {"target": t, "type": "bind", "rw": not ro, "propagation": "rprivate"}
                    for t, (_src, ro) in sorted(expected_mounts(spec).items())
                ],
                "nvidia_visible_devices": job_env(spec)["NVIDIA_VISIBLE_DEVICES"],
                "host_config": {"NetworkMode": "none", "ReadonlyRootfs": True},
            }

        return e._call("applied_isolation", summary)


def output_dir_of(engine: FakeEngine, container_id: str) -> Path:
    """The output directory the container was given (for tests)."""
    return engine._call(
        "output_dir", lambda: engine._get(container_id, "inspecting").spec.output_dir
    )


def _implements_runtime(runtime: FakeRuntime) -> Runtime:
    return runtime  # mypy checks here that FakeRuntime has every method of Runtime
