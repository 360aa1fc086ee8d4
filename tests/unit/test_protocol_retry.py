"""Backoff delays and the one retry policy."""

from __future__ import annotations

import errno
import random
import ssl
from typing import Any

import pytest

from agent.protocol.retry import (
    REDIAL_SOON_S,
    Backoff,
    Cause,
    classify,
    dial_failure_words,
    ended_by_close,
)


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
        (Cause.INVALID_WELCOME, {}, "disconnected", False),
        (Cause.CLOSED_BY_AGENT, {}, "disconnected", False),
        (Cause.LOCAL, {}, "disconnected", False),
    ],
)
def test_classify(cause: Cause, kwargs: dict[str, Any], state: str, at_max: bool) -> None:
    decision = classify(cause, **kwargs)
    assert decision.state == state
    assert decision.at_max_backoff is at_max
    assert decision.words


def test_the_words_of_new_causes() -> None:
    assert classify(Cause.INVALID_WELCOME).words == "control plane sent an invalid welcome"
    assert classify(Cause.CLOSED_BY_AGENT).words == "agent closed the connection"
    assert classify(Cause.LOCAL).words == "agent-side error"


def test_a_close_the_agent_sent_is_the_agents() -> None:
    reason = "frame with 16777217 bytes exceeds limit of 16777216 bytes"
    ended = ended_by_close((1009, reason), None, sent_first=False)
    assert ended.cause is Cause.CLOSED_BY_AGENT
    assert ended.detail == f"1009 message too big ({reason})"
    # The control plane echoing the agent's close does not make it the control plane's.
    echoed = ended_by_close((1007, ""), (1007, ""), sent_first=True)
    assert echoed.cause is Cause.CLOSED_BY_AGENT
    assert echoed.detail == "1007 invalid frame payload data"
    assert ended_by_close((1011, "keepalive ping timeout"), None, sent_first=False).cause is (
        Cause.KEEPALIVE
    )


def test_a_close_the_control_plane_sent_is_theirs_with_a_printable_reason() -> None:
    ended = ended_by_close((4409, ""), (4409, "replaced\x1b[2J" + "r" * 200), sent_first=False)
    assert ended.cause is Cause.CLOSED and ended.close_code == 4409
    assert ended.detail is not None
    assert "\x1b" not in ended.detail and len(ended.detail) <= 123
    assert ended_by_close(None, None, sent_first=False).cause is Cause.CLOSED


def test_dial_failure_words_never_quote_addresses() -> None:
    refused = ConnectionRefusedError(errno.ECONNREFUSED, "Connect call failed ('10.0.0.1', 9)")
    assert dial_failure_words(refused) == "connection refused"
    assert dial_failure_words(TimeoutError()) == "timed out"
    tls = ssl.SSLCertVerificationError(1, "certificate verify failed: for host 10.0.0.1")
    assert dial_failure_words(tls).startswith("TLS: ")
    assert "10.0.0.1" not in dial_failure_words(tls)


@pytest.mark.parametrize("code", [1001, 1012])
def test_a_clean_goodbye_after_a_welcome_is_redialled_soon(code: int) -> None:
    """Attack: a control plane redeploy (1001 going away, 1012 restart) left agents
    waiting out the backoff they had reached, up to reconnect.max_s, before redialling."""
    decision = classify(Cause.CLOSED, close_code=code, established=True)
    assert decision.redial_soon and not decision.at_max_backoff
    assert decision.state == "disconnected"
    assert str(code) in decision.words


@pytest.mark.parametrize(
    ("cause", "kwargs"),
    [
        (Cause.CLOSED, {"close_code": 1001, "established": False}),
        (Cause.CLOSED, {"close_code": 1000, "established": True}),
        (Cause.CLOSED, {"close_code": 1011, "established": True}),
        (Cause.CLOSED, {"close_code": 4409, "established": True}),
        (Cause.KEEPALIVE, {"established": True}),
    ],
)
def test_other_endings_keep_their_backoff(cause: Cause, kwargs: dict[str, Any]) -> None:
    """Attack: a control plane that closes 1001 before its welcome would, redialled at
    once, keep the agent in a tight dial loop; only a clean goodbye of a welcomed session
    skips the backoff."""
    assert not classify(cause, **kwargs).redial_soon


@pytest.mark.parametrize("initial_s", [0.2, 1.0, 30.0])
def test_soon_is_within_five_seconds_and_forgets_earlier_failures(initial_s: float) -> None:
    """Attack: an agent whose backoff had grown to minutes stayed dark that long after a
    control plane restart that took seconds."""
    backoff = Backoff(initial_s, 600.0, rand=lambda: 0.999999)
    for _ in range(8):
        backoff.next_delay()
    delay = backoff.next_delay(soon=True)
    assert delay < min(REDIAL_SOON_S, initial_s) <= 5.0
    # If the control plane is not back yet, backoff starts over from initial_s.
    assert backoff.next_delay() == pytest.approx(2 * initial_s, rel=1e-3)


def test_soon_is_jittered() -> None:
    """Attack: a fleet told 1001 at once redialling at once (a thundering herd)."""
    rng = random.Random(11)
    delays = [Backoff(30.0, 600.0, rand=rng.random).next_delay(soon=True) for _ in range(500)]
    assert min(delays) < 0.1 and max(delays) > REDIAL_SOON_S - 0.1
