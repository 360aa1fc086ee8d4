"""What the control-plane link tells people: ``/status`` facts and log lines. No I/O.

:class:`LinkReport` holds the :class:`~agent.health.facts.ControlPlaneFacts` that
``agent.connection`` updates and publishes, and writes the link's log lines. Every
string that came from the control plane goes through
:func:`~agent.protocol.messages.printable` before it is logged or shown, and the lines
a peer can cause once per frame (its ``error`` messages, frames answered or dropped)
are throttled: at most :data:`PER_FRAME_LINES` of each kind a minute, then one count.

Two times a person (and ``/healthz``) reads: ``last_contact``, refreshed while the
session is open (an open session is one whose keepalive pings are answered, however
quiet the control plane is), and ``since``, which while the link is down is the moment
it went down (the first failure), kept across the retries that follow.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import structlog

from agent import logs
from agent.health.facts import ControlPlaneFacts
from agent.protocol import messages
from agent.protocol.retry import Decision
from agent.protocol.session import Answered, Event, Ignored, PeerError, Welcomed

log = structlog.get_logger("agent.connection")

PER_FRAME_LINES = 10


class LinkReport:
    """The link's facts and log lines. One owner: the connection."""

    def __init__(self, publish: Callable[[ControlPlaneFacts], None]) -> None:
        self._publish = publish
        # Never connected yet: down since the agent started.
        self.facts = ControlPlaneFacts(configured=True, state="disconnected")
        self._throttle = logs.Throttle(limit=PER_FRAME_LINES, window_s=60.0)

    def connecting(self) -> None:
        self._update(state="connecting", attempts=self.facts.attempts + 1, next_attempt_at=None)

    def connected(self, welcome: Welcomed) -> None:
        log.info(
            "control_plane_connected", session=welcome.session, heartbeat_s=welcome.heartbeat_s
        )
        now = time.time()
        self._update(
            state="connected",
            since=now,
            session_id=welcome.session,
            last_contact=now,
            last_error=None,
            backoff_s=None,
            next_attempt_at=None,
        )

    def in_contact(self) -> None:
        """The session is open: record contact now (called once per heartbeat)."""
        self._update(last_contact=time.time())

    def disconnected(
        self, decision: Decision, words: str, delay: float, *, up_until_now: bool
    ) -> None:
        """A dial or a session ended; the next dial is in ``delay`` seconds.

        ``up_until_now``: an established session whose pings were answered to the end,
        so the control plane was in contact until this moment.
        """
        for kind, count in self._throttle.drain().items():
            log.warning("control_plane_log_suppressed", kind=kind, count=count)
        log.warning(
            "control_plane_disconnected",
            state=decision.state,
            reason=words,
            retry_in_s=round(delay, 2),
        )
        now = time.time()
        # The outage began now if the link was up; a failed retry continues the outage
        # that began earlier ("disconnected since" is its first failure, not the latest).
        went_down = self.facts.state == "connected"
        self._update(
            state=decision.state,
            since=now if went_down else self.facts.since,
            last_error=words,
            session_id=None,
            backoff_s=round(delay, 3),
            next_attempt_at=now + delay,
            last_contact=now if up_until_now else self.facts.last_contact,
        )

    def peer_event(self, event: Event) -> None:
        """Log an error received, a frame answered or a frame dropped (throttled)."""
        if isinstance(event, PeerError):
            self._throttled(
                "warning",
                "control_plane_error",
                code=messages.printable(event.code),
                detail=None if event.detail is None else messages.printable(event.detail),
                ref=None if event.ref is None else messages.printable(event.ref),
            )
        elif isinstance(event, Answered):
            self._throttled(
                "warning", "control_plane_bad_frame", answered=event.code, detail=event.detail
            )
        elif isinstance(event, Ignored):
            self._throttled(
                "info", "control_plane_frame_ignored", why=messages.printable(event.why)
            )

    def _throttled(self, level: str, event: str, **fields: Any) -> None:
        dropped = self._throttle.admit(event)
        if dropped is None:
            return
        if dropped:
            fields["suppressed_before"] = dropped
        getattr(log, level)(event, **fields)

    def _update(self, **changes: Any) -> None:
        self.facts = dataclasses.replace(self.facts, **changes)
        self._publish(self.facts)
