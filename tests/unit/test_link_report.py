"""What the link reports: "disconnected since" and "last contact" (issue 12, honest health)."""

from __future__ import annotations

import types

import pytest

from agent import link_report
from agent.health.facts import ControlPlaneFacts, NodeFacts, assess
from agent.link_report import LinkReport
from agent.protocol.retry import Cause, classify
from agent.protocol.session import Welcomed


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock(1000.0)
    monkeypatch.setattr(link_report, "time", types.SimpleNamespace(time=c.time))
    return c


def _report() -> tuple[LinkReport, list[ControlPlaneFacts]]:
    published: list[ControlPlaneFacts] = []
    return LinkReport(published.append), published


def test_disconnected_since_is_the_first_failure_not_the_latest_retry(clock: Clock) -> None:
    """Attack: each failed retry moved "disconnected since" to the latest attempt, so an
    administrator saw "since 3 s" on an outage an hour old."""
    report, _ = _report()
    report.connecting()
    report.connected(Welcomed(session="s1", heartbeat_s=1.0))
    clock.now = 2000.0
    report.disconnected(classify(Cause.KEEPALIVE), "pings unanswered", 1.0, up_until_now=False)
    for attempt in range(3):
        clock.now = 2100.0 + attempt * 100
        report.connecting()
        report.disconnected(classify(Cause.UNREACHABLE), "refused", 1.0, up_until_now=False)
    assert report.facts.state == "disconnected"
    assert report.facts.since == 2000.0
    assert report.facts.attempts == 4


def test_an_idle_open_link_is_contact(clock: Clock) -> None:
    """Attack: a control plane that sends nothing after its welcome (only keepalive pongs)
    left "last contact" at the welcome, so the node was unhealthy the moment the link
    dropped after an idle spell."""
    report, published = _report()
    report.connecting()
    report.connected(Welcomed(session="s1", heartbeat_s=1.0))
    clock.now = 1500.0
    report.in_contact()  # a heartbeat on the open session; the control plane says nothing
    assert published[-1].last_contact == 1500.0
    clock.now = 4000.0
    going_away = classify(Cause.CLOSED, close_code=1001, established=True)
    report.disconnected(going_away, going_away.words, 0.5, up_until_now=True)
    assert report.facts.last_contact == 4000.0 and report.facts.since == 4000.0
    facts = NodeFacts(started_at=0.0, control_plane=report.facts)
    assert assess(facts, max_disconnected_s=2, now=4001.0) == []
    assert [p.code for p in assess(facts, max_disconnected_s=2, now=4003.0)] == [
        "control_plane_unreachable"
    ]
