"""Who ended a job's container, the job or the engine; and the engine watch's transitions."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
import structlog

from agent.config.models import LimitsConfig
from agent.errors import ContainerNotFound, RuntimeUnavailable, WaitTimeout
from agent.health.facts import NodeFacts, assess
from agent.jobs.admission import node_refusal
from agent.jobs.engine import ContainerLost, check_not_lost, lost_to_engine, wait_slice
from agent.runtime.base import ContainerState, RuntimeInfo
from agent.runtime.watch import EngineWatch

HOST = "unix:///var/run/docker.sock"
DOWN = RuntimeInfo("docker", None, False, False, f"the Docker engine does not answer on {HOST}")
UP = RuntimeInfo("docker", "20.10", False, True, None)
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def exited(code: int | None, *, oom: bool = False, started: datetime = T0) -> ContainerState:
    status = "exited" if code is not None else "dead"
    return ContainerState("c" * 64, status, False, code, oom, started, started, {})


class EngineStub:
    """A runtime whose wait and kill events are set by the test (only what is called)."""

    def __init__(self, *, wait: Exception | ContainerState, signals: list[str] | None = None):
        self._wait, self._signals = wait, signals or []

    def wait(self, container_id: str, timeout_s: float | None) -> ContainerState:
        if isinstance(self._wait, Exception):
            raise self._wait
        return self._wait

    def kill_signals(self, container_id: str, since: datetime | None) -> list[str]:
        return list(self._signals)


@pytest.mark.parametrize(
    ("state", "outage", "signals", "lost"),
    [
        (exited(143), True, [], True),  # dockerd stopped: SIGTERM to the container
        (exited(137), False, ["15", "9"], True),  # its shutdown timeout: SIGKILL
        (exited(None), False, [], True),  # dead without an exit code
        (exited(1), False, [], False),  # the model failed: exit_nonzero stays
        (exited(0), True, [], False),  # finished before the engine went: succeeded
        (exited(137, oom=True), True, [], False),  # the kernel's OOM kill is the job's
    ],
)
def test_only_the_engine_ending_a_container_is_container_lost(
    state: ContainerState, outage: bool, signals: list[str], lost: bool
) -> None:
    """Attack: dockerd stops (or restarts) during a job and kills its container; the
    job was reported exit_nonzero, blaming the provider's model for the node's engine.
    And the converse: a model that exits 1 must not be excused as container_lost."""
    assert lost_to_engine(state, outage=outage, signals=signals) is lost


def test_watch_logs_each_transition_once_and_remembers_the_outage() -> None:
    """Attack: an engine that goes away is logged at every probe (or never), so the
    administrator either drowns or learns nothing; the outage is forgotten at once,
    so a job whose container died in it is blamed on the model."""
    watch = EngineWatch(HOST)
    with structlog.testing.capture_logs() as logs:
        watch.observe(UP, now=100)
        assert not watch.observe(DOWN, now=102)
        watch.observe(DOWN, now=104)
        watch.report_down("runner saw it too", now=105)
        assert not watch.up
        assert watch.observe(UP, now=110)
        assert not watch.observe(UP, now=112)
    events = [(e["event"], e.get("error")) for e in logs]
    assert events == [("engine_down", DOWN.error), ("engine_up", None)]
    assert "unix:///var/run/docker.sock" in str(DOWN.error)
    # A container started before the engine came back was alive during the outage.
    assert watch.outage_since(datetime.fromtimestamp(109, UTC))
    assert not watch.outage_since(datetime.fromtimestamp(111, UTC))


def test_no_new_job_while_the_engine_does_not_answer() -> None:
    """Attack: a job assigned while dockerd is down is accepted and then fails
    agent_error, instead of being refused runtime_unavailable for another node."""
    limits = LimitsConfig()
    refusal = node_refusal(limits, active=0, ended_unacked=0, free_mib=None, engine_up=False)
    assert refusal is not None and refusal.code == "runtime_unavailable"
    assert "/" not in refusal.detail  # goes off-site: no socket path
    assert node_refusal(limits, active=0, ended_unacked=0, free_mib=None) is None


def test_healthz_names_the_engine_socket() -> None:
    """Attack: /healthz says only "unhealthy" while the engine is away, or a library's
    nested exception text, not which engine on which socket."""
    facts = NodeFacts(runtime=DOWN)
    problems = assess(facts, max_disconnected_s=60)
    assert [(p.code, p.detail) for p in problems] == [
        ("container_engine_unreachable", f"the Docker engine does not answer on {HOST}")
    ]


def test_a_wait_that_loses_the_engine_waits_for_it_and_does_not_fail_the_job() -> None:
    """Attack: the runner's wait on the container fails while the engine restarts and
    the job ends agent_error at once (or spins on the dead socket), even though the
    container may still run when the engine is back (live-restore)."""
    watch = EngineWatch(HOST)
    stub = EngineStub(wait=RuntimeUnavailable("connection refused"))
    with structlog.testing.capture_logs() as logs:
        assert wait_slice(stub, watch, "c" * 64, 0.01) is None  # type: ignore[arg-type]
    assert not watch.up
    assert [e["event"] for e in logs if e["event"].startswith("engine")] == ["engine_down"]
    still = EngineStub(wait=WaitTimeout("still runs"))
    assert wait_slice(still, watch, "c" * 64, 0.01) is None  # type: ignore[arg-type]


def test_a_container_the_engine_forgot_is_lost() -> None:
    """Attack: the engine comes back without the job's container (its data root was
    wiped, or it was removed); the job ended agent_error instead of container_lost."""
    gone = EngineStub(wait=ContainerNotFound("no such container"))
    with pytest.raises(ContainerLost) as caught:
        wait_slice(gone, EngineWatch(HOST), "c" * 64, 0.01)  # type: ignore[arg-type]
    assert caught.value.reason == "container_lost"


def test_kill_events_or_an_outage_make_a_nonzero_exit_container_lost() -> None:
    """Attack: dockerd's shutdown SIGTERMs the container while its API still answers;
    the wait returns 143 before any probe sees the engine go, and the job is blamed
    exit_nonzero."""
    started = datetime.now(UTC) - timedelta(seconds=5)
    killed = EngineStub(wait=exited(143), signals=["15"])
    with pytest.raises(ContainerLost):
        asyncio.run(check_not_lost(killed, EngineWatch(HOST), exited(143, started=started)))  # type: ignore[arg-type]
    own_failure = EngineStub(wait=exited(1))
    asyncio.run(check_not_lost(own_failure, EngineWatch(HOST), exited(1, started=started)))  # type: ignore[arg-type]
    watch = EngineWatch(HOST)
    watch.report_down("gone")
    with pytest.raises(ContainerLost):
        asyncio.run(check_not_lost(own_failure, watch, exited(137, started=started)))  # type: ignore[arg-type]


def test_a_runner_seeing_the_engine_go_turns_healthz_red_at_once() -> None:
    """Attack: the engine_down line is logged (a runner's wait failed) while /healthz
    still answers 200 from the last probe, so a monitor and the log disagree."""
    facts = NodeFacts()
    watch = EngineWatch(HOST, facts.set_runtime)
    watch.observe(UP)
    assert assess(facts, max_disconnected_s=60) == []
    watch.report_down(f"the Docker engine does not answer on {HOST}")
    assert [p.code for p in assess(facts, max_disconnected_s=60)] == [
        "container_engine_unreachable"
    ]
    watch.observe(UP)
    assert assess(facts, max_disconnected_s=60) == []
