"""Backoff delays and the one retry policy."""

from __future__ import annotations

import random

import pytest

from agent.protocol.retry import Backoff, Cause, classify


def test_full_jitter_doubles_up_to_the_maximum() -> None:
    backoff = Backoff(1.0, 60.0, rand=lambda: 0.999999)
    ceilings = [round(backoff.next_delay()) for _ in range(9)]
    assert ceilings == [1, 2, 4, 8, 16, 32, 60, 60, 60]


def test_jitter_spreads_over_the_whole_window() -> None:
    rng = random.Random(7)
    delays = [Backoff(1.0, 60.0, rand=rng.random).next_delay() for _ in range(1000)]
    assert min(delays) < 0.05
    assert max(delays) > 0.95
    assert all(0 <= d < 1.0 for d in delays)


def test_persistent_failures_wait_at_least_the_maximum() -> None:
    backoff = Backoff(1.0, 60.0, rand=random.Random(3).random)
    delays = [backoff.next_delay(at_max=True) for _ in range(200)]
    assert all(60.0 <= d < 66.0 for d in delays)


def test_reset_only_after_a_long_enough_session() -> None:
    backoff = Backoff(1.0, 60.0, rand=lambda: 0.999999)
    for _ in range(5):
        backoff.next_delay()
    backoff.session_ended(30.0)
    assert backoff.ceiling() == 32
    backoff.session_ended(61.0)
    assert backoff.ceiling() == 1


@pytest.mark.parametrize(
    ("cause", "kwargs", "state", "at_max"),
    [
        (Cause.HTTP_STATUS, {"http_status": 401}, "auth_failed", True),
        (Cause.HTTP_STATUS, {"http_status": 403}, "auth_failed", True),
        (Cause.CLOSED, {"close_code": 4401}, "auth_failed", True),
        (Cause.CLOSED, {"close_code": 4409}, "replaced", True),
        (Cause.UNSUPPORTED_PROTOCOL, {}, "unsupported_protocol", True),
        (Cause.NO_SUBPROTOCOL, {}, "unsupported_protocol", True),
        (Cause.HTTP_STATUS, {"http_status": 502}, "disconnected", False),
        (Cause.CLOSED, {"close_code": 1001}, "disconnected", False),
        (Cause.CLOSED, {}, "disconnected", False),
        (Cause.UNREACHABLE, {}, "disconnected", False),
        (Cause.KEEPALIVE, {}, "disconnected", False),
        (Cause.NO_WELCOME, {}, "disconnected", False),
    ],
)
def test_classify(cause: Cause, kwargs: dict[str, int], state: str, at_max: bool) -> None:
    decision = classify(cause, **kwargs)
    assert decision.state == state
    assert decision.at_max_backoff is at_max
    assert decision.words
