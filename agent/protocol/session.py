"""The agent's side of one control-plane session (docs/protocol.md §3), as a state machine.

No I/O: frames go in through :meth:`Session.receive_text` / :meth:`receive_binary`, which
return events; frames to send accumulate and are taken with :meth:`data_to_send`. The
caller (``agent.connection``) owns the socket, the clock and the timers, and must:

1. call :meth:`initiate` once and send what :meth:`data_to_send` returns (the ``hello``);
2. feed every frame received to ``receive_*`` and act on the events;
3. after :class:`Welcomed`, call :meth:`heartbeat` every ``heartbeat_s`` seconds;
4. send everything :meth:`data_to_send` returns, in order, after each call;
5. close the connection after a :class:`Fatal` event.

Choices where docs/protocol.md is silent (docs/control-plane.md lists them too):

- Before ``welcome`` the agent sends nothing but ``hello`` (§3), so an invalid frame
  received then is not answered; it is reported as :class:`Ignored`. An ``error`` is
  still reported, and ``unsupported_protocol`` is fatal at any time.
- A ``welcome`` that fails validation (``heartbeat_s`` not a positive number,
  ``session`` not a short printable string) is :class:`Fatal` (``invalid_welcome``):
  waiting for another would only end in "no welcome" much later.
- A second ``welcome`` in the same session is ignored.
- ``welcome.heartbeat_s`` below :data:`MIN_HEARTBEAT_S` is raised to it, so that a
  control plane cannot make the agent flood it.
- An ``error`` that is itself invalid is never answered (no error ping-pong between two
  peers that each find the other's errors malformed); it is :class:`Ignored`.
- The strings of a received ``error`` are clipped to :data:`~agent.protocol.messages.MAX_DETAIL`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from agent.protocol import messages

MIN_HEARTBEAT_S = 1.0
MAX_HEARTBEAT_S = 3600.0


class SessionState(Enum):
    IDLE = "idle"
    AWAITING_WELCOME = "awaiting_welcome"
    ESTABLISHED = "established"
    CLOSED = "closed"


@dataclass(frozen=True)
class Welcomed:
    session: str
    heartbeat_s: float


@dataclass(frozen=True)
class Received:
    """A valid message for the job, result or artifact layers."""

    message: messages.Incoming


@dataclass(frozen=True)
class InvalidAssignment:
    """A ``job.assign`` with a usable ``job_id`` but a bad spec: answered ``bad_spec``."""

    job_id: str
    detail: str


@dataclass(frozen=True)
class PeerError:
    """The control plane sent ``error``."""

    code: str
    detail: str | None
    ref: str | None


@dataclass(frozen=True)
class Answered:
    """An invalid frame was answered with ``error``; the session goes on."""

    code: str
    detail: str


@dataclass(frozen=True)
class Ignored:
    """A frame that needs no answer (or may not get one yet) was dropped."""

    why: str


@dataclass(frozen=True)
class Fatal:
    """The session cannot go on; the caller closes and backs off.

    ``code`` is ``unsupported_protocol`` (``detail``: the control plane's, clipped; back
    off at the maximum) or ``invalid_welcome`` (``detail``: the field refused; normal
    backoff).
    """

    code: str
    detail: str | None


Event = Welcomed | Received | InvalidAssignment | PeerError | Answered | Ignored | Fatal


@dataclass
class Stats:
    """Messages in and out by type; shared across sessions by the caller for metrics."""

    received: Counter[str] = field(default_factory=Counter)
    sent: Counter[str] = field(default_factory=Counter)


class SessionError(RuntimeError):
    """The caller used the session out of order (a bug in the caller, not the peer)."""


class Session:
    def __init__(self, hello: dict[str, Any], stats: Stats | None = None) -> None:
        self._hello = hello
        self.state = SessionState.IDLE
        self.session_id: str | None = None
        self.heartbeat_s: float | None = None
        self.stats = stats or Stats()
        self._seq = 0
        self._out: list[str | bytes | memoryview] = []

    # -- outgoing ---------------------------------------------------------------------

    def initiate(self) -> None:
        """Queue ``hello``. Call exactly once, first."""
        if self.state is not SessionState.IDLE:
            raise SessionError("initiate() called twice")
        self.state = SessionState.AWAITING_WELCOME
        self._queue(self._hello)

    def send(self, message: dict[str, Any]) -> None:
        """Queue an application message (``job.*``, ``result.*``, ``artifact.get``).

        Raises :class:`SessionError` before ``welcome`` or after close: the caller must
        hold messages until the session is established.
        """
        if self.state is not SessionState.ESTABLISHED:
            raise SessionError(f"cannot send {message.get('type')} while {self.state.value}")
        self._queue(message)

    def send_frame(self, type_: str, frame: bytes | memoryview) -> None:
        """Queue a binary frame already built (:class:`~agent.protocol.frames.FrameBuffer`)
        whose header's type is ``type_``; queued as it is, not copied, so it must not
        change until :meth:`data_to_send` has handed it out and the caller sent it.
        Same rules as :meth:`send`."""
        if self.state is not SessionState.ESTABLISHED:
            raise SessionError(f"cannot send {type_} while {self.state.value}")
        self.stats.sent[type_] += 1
        self._out.append(frame)

    def heartbeat(self, now: float, telemetry: dict[str, Any]) -> bool:
        """Queue the next ``heartbeat`` (seq 1, 2, … in this session), stamped ``now``.

        Returns False, queueing nothing, when the session is not established.
        """
        if self.state is not SessionState.ESTABLISHED:
            return False
        self._queue(messages.heartbeat(self._seq + 1, now, telemetry))
        self._seq += 1  # only once queued: a heartbeat that cannot be encoded takes no seq
        return True

    def data_to_send(self) -> list[str | bytes | memoryview]:
        """Frames to send, oldest first; the queue is emptied."""
        out, self._out = self._out, []
        return out

    def close(self) -> None:
        self.state = SessionState.CLOSED

    def _queue(self, message: dict[str, Any]) -> None:
        frame = messages.encode_text(message)  # raises (NaN, a non-JSON value) before counting
        self.stats.sent[str(message["type"])] += 1
        self._out.append(frame)

    # -- incoming ---------------------------------------------------------------------

    def receive_text(self, text: str) -> list[Event]:
        """Handle one text frame. Never raises for anything the peer sends."""
        return self._handle(messages.parse_text(text))

    def receive_binary(self, data: bytes) -> list[Event]:
        """Handle one binary frame. Never raises for anything the peer sends."""
        return self._handle(messages.parse_binary(data))

    def _handle(self, parsed: messages.Incoming | messages.Invalid) -> list[Event]:
        if self.state in (SessionState.IDLE, SessionState.CLOSED):
            return [Ignored(f"frame received while {self.state.value}")]
        if isinstance(parsed, messages.Invalid):
            return [self._invalid(parsed)]
        kind = parsed.header.type if isinstance(parsed, messages.ArtifactChunk) else parsed.type
        self.stats.received[kind] += 1
        if isinstance(parsed, messages.ErrorMessage):
            detail = None if parsed.detail is None else messages.clip(parsed.detail)
            if parsed.code == "unsupported_protocol":
                self.state = SessionState.CLOSED
                return [Fatal(parsed.code, detail)]
            ref = None if parsed.ref is None else messages.clip(parsed.ref)
            return [PeerError(messages.clip(parsed.code), detail, ref)]
        if isinstance(parsed, messages.Welcome):
            if self.state is SessionState.ESTABLISHED:
                return [Ignored("second welcome in one session")]
            self.state = SessionState.ESTABLISHED
            self.session_id = parsed.session
            self.heartbeat_s = min(max(float(parsed.heartbeat_s), MIN_HEARTBEAT_S), MAX_HEARTBEAT_S)
            return [Welcomed(parsed.session, self.heartbeat_s)]
        if self.state is not SessionState.ESTABLISHED:
            return [Ignored(f"{kind} before welcome")]
        return [Received(parsed)]

    def _invalid(self, invalid: messages.Invalid) -> Event:
        self.stats.received["(invalid)"] += 1
        if invalid.ref == "welcome" and self.state is SessionState.AWAITING_WELCOME:
            self.state = SessionState.CLOSED
            return Fatal("invalid_welcome", invalid.field or invalid.detail)
        if invalid.ref == "error":
            return Ignored(f"invalid error message: {invalid.detail}")
        if self.state is not SessionState.ESTABLISHED:
            return Ignored(f"invalid frame before welcome: {invalid.detail}")
        if invalid.job_id is not None:
            return InvalidAssignment(invalid.job_id, invalid.detail)
        self._queue(messages.error(invalid.code, invalid.detail, invalid.ref))
        return Answered(invalid.code, invalid.detail)
