"""Reconnect policy: why a session ended, what to tell a person, how long to wait. Pure.

Nothing here is fatal in the sense of "give up": an agent that stops dialling is an
agent somebody must restart by hand, and the control plane may come back at any time.
What :func:`classify` decides is whether a failure is *transient* (normal backoff) or
*persistent* (a refused token, a replaced node, a protocol the control plane does not
speak): those are retried at the maximum backoff only (PROTOCOL.md §1), since retrying
faster cannot help and would hammer the control plane.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

# Close codes of PROTOCOL.md §1.
CLOSE_AUTH_FAILED = 4401
CLOSE_REPLACED = 4409


class Cause(Enum):
    """Why a connection attempt or session ended."""

    UNREACHABLE = "unreachable"  # refused, timed out, DNS, TLS handshake
    HTTP_STATUS = "http_status"  # the upgrade was answered with a non-101 status
    NO_SUBPROTOCOL = "no_subprotocol"  # the peer did not select cloudbender-agent.v1
    CLOSED = "closed"  # the WebSocket closed (with close_code)
    UNSUPPORTED_PROTOCOL = "unsupported_protocol"  # error/unsupported_protocol received
    NO_WELCOME = "no_welcome"  # no welcome in time after hello
    KEEPALIVE = "keepalive"  # no pong in time
    LOCAL = "local"  # our own bug or resource problem while in session


@dataclass(frozen=True)
class Decision:
    state: str  # what /status shows: disconnected, auth_failed, replaced, unsupported_protocol
    at_max_backoff: bool
    words: str  # for a person: "token refused by control plane"


def classify(
    cause: Cause, *, http_status: int | None = None, close_code: int | None = None
) -> Decision:
    """The one place that decides how a failure is retried and reported."""
    if cause is Cause.HTTP_STATUS and http_status in (401, 403):
        return Decision("auth_failed", True, f"token refused by control plane (HTTP {http_status})")
    if cause is Cause.CLOSED and close_code == CLOSE_AUTH_FAILED:
        return Decision("auth_failed", True, "token refused by control plane (close 4401)")
    if cause is Cause.CLOSED and close_code == CLOSE_REPLACED:
        return Decision(
            "replaced", True, "another agent connected with the same node id (close 4409)"
        )
    if cause is Cause.UNSUPPORTED_PROTOCOL:
        return Decision(
            "unsupported_protocol", True, "control plane does not speak protocol version 1"
        )
    if cause is Cause.NO_SUBPROTOCOL:
        # A server that does not select our subprotocol is not a control plane of this
        # protocol (or a proxy in the way): a configuration problem, not a blip.
        return Decision(
            "unsupported_protocol", True, "control plane did not select cloudbender-agent.v1"
        )
    if cause is Cause.HTTP_STATUS:
        return Decision("disconnected", False, f"control plane answered HTTP {http_status}")
    if cause is Cause.CLOSED:
        code = "no close code" if close_code is None else f"close code {close_code}"
        return Decision("disconnected", False, f"connection closed ({code})")
    if cause is Cause.NO_WELCOME:
        return Decision("disconnected", False, "control plane sent no welcome")
    if cause is Cause.KEEPALIVE:
        return Decision("disconnected", False, "control plane stopped answering pings")
    if cause is Cause.LOCAL:
        return Decision("disconnected", False, "agent error during the session")
    return Decision("disconnected", False, "control plane unreachable")


class Backoff:
    """Exponential backoff with full jitter (AWS architecture blog's "Full Jitter").

    ``next_delay`` returns a delay in ``[0, min(max_s, initial_s * 2**attempt))``; with
    ``at_max`` (persistent failures) one in ``[max_s, 1.1 * max_s)``. Reset after a
    session that lasted longer than ``max_s`` (:meth:`session_ended`). The caller
    sleeps; this class only counts.
    """

    def __init__(
        self,
        initial_s: float,
        max_s: float,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self._rand = rand
        self.attempt = 0

    def ceiling(self) -> float:
        return min(self.max_s, self.initial_s * 2.0 ** min(self.attempt, 62))

    def next_delay(self, *, at_max: bool = False) -> float:
        if at_max:
            # Persistent failures wait the full maximum, never less, plus up to 10 %
            # so that a fleet refused at once does not come back at once.
            delay = self.max_s * (1.0 + 0.1 * self._rand())
        else:
            delay = self.ceiling() * self._rand()
        self.attempt += 1
        return delay

    def session_ended(self, lasted_s: float) -> None:
        """Forget earlier failures after a session that proved the path works."""
        if lasted_s > self.max_s:
            self.attempt = 0
