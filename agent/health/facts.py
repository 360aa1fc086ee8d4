"""The facts the agent's health is derived from, and the one predicate over them.

The daemon's event loop writes facts; the health server's thread reads them. Writers
replace whole immutable values (a sample, a timestamp) rather than mutating shared
structures, so a reader always sees a consistent value without taking the loop's time.

:func:`assess` is the single health predicate: ``/healthz`` answers 503 when it returns
any problem, and the systemd watchdog is fed only while it returns no problem that a
restart of the agent could cure (a hung loop, an unwritable state directory). A lost
GPU or an unreachable control plane makes the node unhealthy, but restarting the agent
would not bring them back, so they do not starve the watchdog.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from agent.gpu.base import GpuInventory
from agent.health.diskfloor import disk_floor_problem
from agent.jobs.tally import JobTally
from agent.protocol.session import Stats
from agent.runtime.base import RuntimeInfo

# The loop ticks every LOOP_TICK_S; a loop silent for LOOP_STALL_S is considered hung.
LOOP_TICK_S = 1.0
LOOP_STALL_S = 10.0

# Every state of the link, in the order /status and the metrics list them.
CONTROL_PLANE_STATES = (
    "not configured",
    "connecting",
    "connected",
    "disconnected",
    "auth_failed",
    "replaced",
    "unsupported_protocol",
)


@dataclass(frozen=True)
class HostSample:
    cpu_logical: int
    cpu_model: str | None
    cpu_pct: float | None
    memory_total_mib: int
    memory_used_mib: int
    state_dir_free_mib: int | None

    def to_dict(self) -> dict[str, object]:
        return {
            "cpu": {"logical": self.cpu_logical, "model": self.cpu_model},
            "cpu_pct": self.cpu_pct,
            "memory_total_mib": self.memory_total_mib,
            "memory_used_mib": self.memory_used_mib,
            "state_dir_free_mib": self.state_dir_free_mib,
        }


@dataclass(frozen=True)
class Problem:
    """One reason the node is unhealthy, in words a person can act on."""

    code: str
    detail: str
    # True when restarting the agent could cure it; only these starve the watchdog.
    restart_helps: bool = False

    def to_dict(self) -> dict[str, object]:
        return {"code": self.code, "detail": self.detail}


@dataclass(frozen=True)
class ControlPlaneFacts:
    """The link to the control plane. Replaced whole on every change."""

    configured: bool
    state: str  # one of CONTROL_PLANE_STATES
    # When this state began; while the link is down, when it went down (kept across
    # retries and across the down states: disconnected, auth_failed, …).
    since: float = field(default_factory=time.time)
    # Last time the link was known up (an open session, its keepalive pings answered).
    last_contact: float | None = None
    last_error: str | None = None
    session_id: str | None = None
    next_attempt_at: float | None = None
    backoff_s: float | None = None
    attempts: int = 0

    def to_dict(self) -> dict[str, object]:
        return {
            "state": self.state,
            "since": self.since,
            "last_contact": self.last_contact,
            "last_error": self.last_error,
            "session_id": self.session_id,
            "next_attempt_at": self.next_attempt_at,
            "backoff_s": self.backoff_s,
            "attempts": self.attempts,
        }


@dataclass
class NodeFacts:
    """Mutable holder of the latest facts; each attribute is replaced whole."""

    started_at: float = field(default_factory=time.time)
    loop_tick: float = field(default_factory=time.monotonic)
    gpus: GpuInventory | None = None
    host: HostSample | None = None
    # Set by the state-directory check; None while the directory is writable.
    state_dir_problem: Problem | None = None
    control_plane: ControlPlaneFacts = field(
        default_factory=lambda: ControlPlaneFacts(configured=False, state="not configured")
    )
    # Messages in and out by type, across sessions; mutated only by the event loop.
    messages: Stats = field(default_factory=Stats)
    runtime: RuntimeInfo | None = None
    # Unacknowledged jobs as the job manager last published them.
    jobs: tuple[dict[str, Any], ...] = ()
    # The job manager's counts of ended jobs (its reads are thread-safe); None until
    # the job system is built.
    tally: JobTally | None = None
    # Whether the node takes no new jobs: set by the operator's drain and undrain
    # (agent.control.commands), and at start from the drained flag in state_dir.
    draining: bool = False
    # Changed keys the running agent keeps its start values for, as the last SIGHUP
    # reload found them (agent.reload); empty once the file matches again.
    pending_restart: tuple[str, ...] = ()

    def set_runtime(self, info: RuntimeInfo) -> None:
        """Replace the engine's facts (agent.runtime.watch publishes here, from any thread)."""
        self.runtime = info


def assess(
    facts: NodeFacts,
    *,
    max_disconnected_s: float,
    min_free_mib: int | None = None,
    now: float | None = None,
    monotonic_now: float | None = None,
) -> list[Problem]:
    """Every reason the node is unhealthy now; an empty list means healthy. Pure."""
    now = time.time() if now is None else now
    monotonic_now = time.monotonic() if monotonic_now is None else monotonic_now
    problems: list[Problem] = []
    stalled = monotonic_now - facts.loop_tick
    if stalled > LOOP_STALL_S:
        problems.append(
            Problem("event_loop_stalled", f"event loop unresponsive for {stalled:.0f} s", True)
        )
    if facts.state_dir_problem is not None:
        problems.append(facts.state_dir_problem)
    if (low := disk_floor_problem(facts.host, min_free_mib)) is not None:
        problems.append(low)
    if facts.gpus is not None:
        for gpu in facts.gpus.gpus:
            if gpu.health != "ok":
                why = "; ".join(gpu.health_reasons) or gpu.health
                problems.append(
                    Problem(f"gpu_{gpu.health}", f"GPU {gpu.index} ({gpu.uuid}): {why}")
                )
    if facts.runtime is not None and not facts.runtime.reachable:
        # In words, with the socket: "the Docker engine does not answer on unix://…".
        detail = facts.runtime.error or "the container engine does not answer"
        problems.append(Problem("container_engine_unreachable", detail))
    cp = facts.control_plane
    if cp.configured and cp.state != "connected":
        # Counted from the moment the link went down (``since``: the outage's first
        # failure, or the start), not from the control plane's last message: a quiet
        # control plane on an open link is in contact, and a redeploy after an idle
        # hour must not turn the node unhealthy the instant the link drops.
        down_s = now - cp.since
        if down_s > max_disconnected_s:
            detail = f"no contact with the control plane for {down_s:.0f} s"
            if cp.last_error:
                detail += f" ({cp.last_error})"
            problems.append(Problem("control_plane_unreachable", detail))
    return problems


def watchdog_ok(problems: list[Problem]) -> bool:
    """Whether systemd's watchdog may be fed: no problem a restart would cure."""
    return not any(p.restart_helps for p in problems)
