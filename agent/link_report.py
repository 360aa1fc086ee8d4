"""What the control-plane link tells people: ``/status`` facts and log lines. No I/O.

:class:`LinkReport` holds the :class:`~agent.health.facts.ControlPlaneFacts` that
``agent.connection`` updates and publishes, and writes the link's log lines. Every
string that came from the control plane goes through
:func:`~agent.protocol.messages.printable` before it is logged or shown, and the lines
a peer can cause once per frame (its ``error`` messages, frames answered or dropped)
are throttled: at most :data:`PER_FRAME_LINES` of each kind a minute, then one count.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import structlog

from agent import logs
from agent.health.facts import ControlPlaneFacts
from agent.protocol import messages as m
from agent.protocol import session as s
from agent.protocol.retry import Decision

log = structlog.get_logger("agent.connection")

PER_FRAME_LINES = 10


class LinkReport:
    """The link's facts and log lines. One owner: the connection."""

    def __init__(self, publish: Callable[[ControlPlaneFacts], None]) -> None:
        self._publish = publish
        self.facts = ControlPlaneFacts(configured=True, state="disconnected")
        self.last_frame_at: float | None = None
        self._throttle = logs.Throttle(limit=PER_FRAME_LINES, window_s=60.0)

    def connecting(self) -> None:
        self._update(state="connecting", attempts=self.facts.attempts + 1, next_attempt_at=None)

    def connected(self, welcome: s.Welcomed) -> None:
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

    def heartbeat_sent(self) -> None:
        self._update(last_contact=self.last_frame_at or self.facts.last_contact)

    def disconnected(self, decision: Decision, words: str, delay: float) -> None:
        for kind, count in self._throttle.drain().items():
            log.warning("control_plane_log_suppressed", kind=kind, count=count)
        log.warning(
            "control_plane_disconnected",
            state=decision.state,
            reason=words,
            retry_in_s=round(delay, 2),
        )
        now = time.time()
        self._update(
            state=decision.state,
            since=now,
            last_error=words,
            session_id=None,
            backoff_s=round(delay, 3),
            next_attempt_at=now + delay,
            last_contact=self.last_frame_at or self.facts.last_contact,
        )

    def peer_event(self, event: s.Event) -> None:
        """Log an error received, a frame answered or a frame dropped (throttled)."""
        if isinstance(event, s.PeerError):
            self._throttled(
                "warning",
                "control_plane_error",
                code=m.printable(event.code),
                detail=None if event.detail is None else m.printable(event.detail),
                ref=None if event.ref is None else m.printable(event.ref),
            )
        elif isinstance(event, s.Answered):
            self._throttled(
                "warning", "control_plane_bad_frame", answered=event.code, detail=event.detail
            )
        elif isinstance(event, s.Ignored):
            self._throttled("info", "control_plane_frame_ignored", why=m.printable(event.why))

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
