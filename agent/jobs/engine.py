"""A job's container and an engine that goes away: who ended it, the job or the engine?

docs/protocol.md §4: ``exit_nonzero`` blames the provider's model, ``container_lost``
says the container "vanished or was killed by the engine, not by the job". When
dockerd stops it kills its containers (SIGTERM, then SIGKILL after its shutdown
timeout): the runner's wait then returns 143 or 137 while the engine still answers,
or fails because it no longer does. A dockerd killed outright leaves its containers
running; it kills them when it starts again (without ``live-restore``) or finds them
still running (with it). What the runner does:

- Its wait fails because the engine does not answer (:func:`wait_slice`): report it to
  the :class:`~agent.runtime.watch.EngineWatch` and wait for the engine to come back,
  in slices, so the job's timeout and a cancel still apply. Then wait again: a
  container still running is waited for as before.
- The container is gone: ``container_lost`` (:class:`ContainerLost`).
- It exited non-zero (and not OOM-killed): :func:`check_not_lost` asks whether the
  engine was down at some moment after the container started, or sent it a signal the
  agent did not ask for (its ``kill`` events); either way ``container_lost``, with the
  exit code kept. A job that exits 0 succeeded, whatever the engine did after.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Protocol, runtime_checkable

import structlog

from agent.errors import ContainerNotFound, ContainerRuntimeError, RuntimeUnavailable, WaitTimeout
from agent.runtime.base import ContainerState, Runtime
from agent.runtime.watch import EngineWatch

log = structlog.get_logger(__name__)


class ContainerLost(ContainerRuntimeError):
    """The job's container vanished, or the engine (not the job) ended it.

    :attr:`reason` is the docs/protocol.md §4 failure reason the runner reports."""

    reason = "container_lost"


@runtime_checkable
class KillHistory(Protocol):
    """A runtime that can say which signals the engine sent a container (Docker's
    ``kill`` events). Optional: without it, only outages mark a container lost."""

    def kill_signals(self, container_id: str, since: datetime | None) -> list[str]: ...


def lost_to_engine(exited: ContainerState, *, outage: bool, signals: Sequence[str]) -> bool:
    """Whether a stopped container was ended by the engine rather than by its job.

    ``outage``: the engine was down at some moment after the container started.
    ``signals``: what the engine sent it since it started (none of it asked by the
    agent: the runner's own stops never come here). A clean exit (0) and an OOM kill
    are the job's own, whatever happened around them. Pure."""
    if exited.running:
        return False
    if exited.exit_code == 0 or exited.oom_killed:
        return False
    return outage or bool(signals) or exited.exit_code is None


def wait_slice(
    runtime: Runtime, watch: EngineWatch | None, container_id: str, slice_s: float
) -> ContainerState | None:
    """One short wait on the container, in a worker thread: its final state, or
    ``None`` when it still runs or the engine does not answer (then this thread waits
    up to ``slice_s`` for the engine to come back, so the caller's loop does not spin).
    Raises :class:`ContainerLost` when the engine no longer knows the container."""
    try:
        return runtime.wait(container_id, slice_s)
    except WaitTimeout:
        return None
    except ContainerNotFound as exc:
        raise ContainerLost(f"container {container_id[:12]} is gone: {exc}") from exc
    except RuntimeUnavailable as exc:
        if watch is None:
            raise
        log.debug("container_wait_failed", container=container_id[:12], error=str(exc))
        watch.report_down(f"the Docker engine does not answer on {watch.docker_host}")
        watch.wait_up(slice_s)
        return None


async def check_not_lost(
    runtime: Runtime, watch: EngineWatch | None, exited: ContainerState
) -> None:
    """Raise :class:`ContainerLost` when the engine, not the job, ended ``exited``
    (:func:`lost_to_engine`). Asks the engine for its kill events only for a non-zero
    exit; an engine that does not answer at that moment is itself an outage."""
    if exited.exit_code == 0 or exited.oom_killed:
        return
    outage = watch is not None and watch.outage_since(exited.started_at)
    signals: list[str] = []
    if not outage and isinstance(runtime, KillHistory):
        try:
            signals = await asyncio.to_thread(runtime.kill_signals, exited.id, exited.started_at)
        except RuntimeUnavailable:
            outage = True  # it went away as the container stopped: shutting down
            if watch is not None:
                watch.report_down(f"the Docker engine does not answer on {watch.docker_host}")
        except ContainerRuntimeError as exc:
            log.warning("container_events_unreadable", container=exited.id[:12], error=str(exc))
    if lost_to_engine(exited, outage=outage, signals=signals):
        why = "the engine went away" if outage else f"the engine sent it signal(s) {signals}"
        raise ContainerLost(f"container {exited.id[:12]} exited {exited.exit_code}: {why}")


async def reap_abandoned(runtime: Runtime, node_id: str, abandoned: Callable[[str], bool]) -> int:
    """Remove this node's job containers whose job ended or is unknown (``abandoned``),
    e.g. those the runner could not remove while the engine was down. Returns how many.
    Raises :class:`~agent.errors.ContainerRuntimeError` if the engine cannot list them."""
    removed = 0
    for container in await asyncio.to_thread(runtime.list_jobs, node_id):
        job_id = container.job_id
        if job_id is None or not abandoned(job_id):
            continue
        try:
            await asyncio.to_thread(runtime.remove, container.id)
        except ContainerRuntimeError as exc:
            log.error("container_remove_failed", job_id=job_id, error=str(exc))
            continue
        log.info("container_reaped", job_id=job_id, container=container.id[:12], why="engine back")
        removed += 1
    return removed
