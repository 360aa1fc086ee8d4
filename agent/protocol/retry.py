"""Reconnect policy: why a session ended, what to tell a person, how long to wait. Pure.

Nothing here is fatal in the sense of "give up": an agent that stops dialling is an
agent somebody must restart by hand, and the control plane may come back at any time.
What :func:`classify` decides is whether a failure is *transient* (normal backoff) or
*persistent* (a refused token, a replaced node, a protocol the control plane does not
speak): those are retried at the maximum backoff only (docs/protocol.md §1), since retrying
faster cannot help and would hammer the control plane. A third kind is the control
plane's own clean goodbye (1001 going away, 1012 service restart) of an established
session: a redeploy, redialled within :data:`REDIAL_SOON_S` whatever backoff earlier
failures had reached.
"""

from __future__ import annotations

import os
import random
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from agent.protocol.messages import printable

# Close codes of docs/protocol.md §1.
CLOSE_AUTH_FAILED = 4401
CLOSE_REPLACED = 4409
# RFC 6455 §7.4.1 and the IANA registry: a server going down or restarting on purpose.
CLOSE_GOING_AWAY = 1001
CLOSE_SERVICE_RESTART = 1012
# After such a clean close the agent redials within [0, REDIAL_SOON_S) seconds. The
# promise (docs/protocol.md §1) is "connected again within 5 s": the jitter stops at 4 s
# so that the dial, TLS and hello fit in the last second.
CONNECTED_AGAIN_WITHIN_S = 5.0
REDIAL_SOON_S = 4.0


class Cause(Enum):
    """Why a connection attempt or session ended."""

    UNREACHABLE = "unreachable"  # refused, timed out, DNS, TLS handshake
    HTTP_STATUS = "http_status"  # the upgrade was answered with a non-101 status
    NO_SUBPROTOCOL = "no_subprotocol"  # the peer did not select cloudbender-agent.v1
    CLOSED = "closed"  # the control plane closed the WebSocket (close_code: theirs)
    CLOSED_BY_AGENT = "closed_by_agent"  # websockets closed it for us: 1007, 1009, …
    UNSUPPORTED_PROTOCOL = "unsupported_protocol"  # error/unsupported_protocol received
    NO_WELCOME = "no_welcome"  # no welcome in time after hello
    INVALID_WELCOME = "invalid_welcome"  # a welcome that fails validation
    KEEPALIVE = "keepalive"  # no pong in time
    LOCAL = "local"  # a local setting (token, TLS files) or our own bug, not the peer
    TLS_SERVER_CERT = "tls_server_cert"  # the agent refused the control plane's certificate
    TLS_CLIENT_CERT = "tls_client_cert"  # a TLS alert: our client certificate refused/missing
    TLS_CLOSED = "tls_closed"  # wss: closed after the TLS handshake, before any HTTP answer


class Ended(Exception):
    """A dial or a session ended, and why: what :func:`classify` takes.

    Whoever raises it has already closed the socket.
    """

    def __init__(
        self,
        cause: Cause,
        *,
        http_status: int | None = None,
        close_code: int | None = None,
        detail: str | None = None,
    ) -> None:
        super().__init__(cause.value)
        self.cause, self.http_status, self.close_code, self.detail = (
            cause,
            http_status,
            close_code,
            detail,
        )


# RFC 6455 §7.4.1, for the codes websockets sends on its own.
_CLOSE_WORDS = {
    1000: "normal closure",
    1001: "going away",
    1002: "protocol error",
    1003: "unsupported data",
    1007: "invalid frame payload data",
    1008: "policy violation",
    1009: "message too big",
    1011: "internal error",
    1012: "service restart",
}


def ended_by_close(
    sent: tuple[int, str] | None, rcvd: tuple[int, str] | None, *, sent_first: bool
) -> Ended:
    """Why a session ended with the close frames ``sent`` and ``rcvd`` (code, reason).

    ``sent_first``: the agent closed first, and ``rcvd`` (if any) is the peer's echo. A
    close the agent's WebSocket library started (1009 for a frame over 16 MiB, 1007 for
    invalid UTF-8) is reported as the agent's, not as "closed (no close code)".
    """
    if sent is not None and (rcvd is None or sent_first):
        code, reason = sent
        if code == 1011 and "keepalive" in reason:
            return Ended(Cause.KEEPALIVE)
        words = f"{code} {_CLOSE_WORDS.get(code, 'close')}"
        if reason:
            words += f" ({printable(reason, 100)})"
        return Ended(Cause.CLOSED_BY_AGENT, detail=words)
    if rcvd is not None:
        code, reason = rcvd
        return Ended(Cause.CLOSED, close_code=code, detail=printable(reason, 123) or None)
    return Ended(Cause.CLOSED)


def dial_failure_words(exc: BaseException) -> str:
    """A person's words for a failed dial (``OSError``, ``TimeoutError``): the errno, the
    TLS reason, never an address or a certificate's text."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {getattr(exc, 'reason', None) or type(exc).__name__}"
    if isinstance(exc, OSError) and exc.errno:
        # asyncio words refusals as "Connect call failed ('127.0.0.1', 9)"; the errno
        # says it plainly.
        return os.strerror(exc.errno).lower()
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return type(exc).__name__


@dataclass(frozen=True)
class Decision:
    state: str  # what /status shows: disconnected, auth_failed, replaced, unsupported_protocol
    at_max_backoff: bool
    words: str  # for a person: "token refused by control plane"
    # Redial within REDIAL_SOON_S and forget earlier failures (Backoff.next_delay(soon=)).
    redial_soon: bool = False


def classify(
    cause: Cause,
    *,
    http_status: int | None = None,
    close_code: int | None = None,
    established: bool = False,
) -> Decision:
    """The one place that decides how a failure is retried and reported.

    ``established``: the session had been welcomed before it ended (a dial or a
    handshake that failed was not).
    """
    if cause is Cause.HTTP_STATUS and http_status in (401, 403):
        return Decision("auth_failed", True, f"token refused by control plane (HTTP {http_status})")
    if cause is Cause.CLOSED and close_code == CLOSE_AUTH_FAILED:
        # The reference control plane also closes 4401 when a valid client certificate
        # names another node than the hello: its close reason (the detail) says which.
        return Decision(
            "auth_failed", True, "token or client certificate refused by control plane (close 4401)"
        )
    if cause is Cause.TLS_CLIENT_CERT:
        # A TLS alert about our certificate is the control plane refusing our
        # credentials, as a 401 refuses the token: it will not change by itself.
        return Decision(
            "auth_failed", True, "client certificate missing or refused by control plane"
        )
    if cause is Cause.TLS_SERVER_CERT:
        # A certificate the agent does not trust (or for another name, or out of date)
        # is fixed by a person on one side or the other, not by dialling faster.
        return Decision("disconnected", True, "agent refused the control plane's TLS certificate")
    if cause is Cause.TLS_CLOSED:
        # Perhaps our client certificate refused by a server that sends no alert, perhaps
        # a control plane going down: the agent cannot tell, so normal backoff.
        return Decision(
            "disconnected", False, "control plane closed the connection after the TLS handshake"
        )
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
    if cause is Cause.CLOSED and close_code in (CLOSE_GOING_AWAY, CLOSE_SERVICE_RESTART):
        # A control plane that welcomed us and then says goodbye cleanly is being
        # redeployed or restarted: it will be back in seconds, and the backoff earlier
        # failures had reached (up to max_s) would leave the node dark for no reason.
        # Only after a welcome, though: one that closes 1001 before welcoming keeps
        # refusing us, and a prompt redial would turn that into a tight loop.
        words = _CLOSE_WORDS[close_code]
        return Decision(
            "disconnected",
            False,
            f"control plane closed the connection ({close_code} {words})",
            redial_soon=established,
        )
    if cause is Cause.CLOSED:
        code = "no close code" if close_code is None else f"close code {close_code}"
        return Decision("disconnected", False, f"connection closed ({code})")
    if cause is Cause.CLOSED_BY_AGENT:
        # The agent refused something the control plane sent (a frame over 16 MiB,
        # invalid UTF-8): a misbehaving peer, but perhaps a transient one.
        return Decision("disconnected", False, "agent closed the connection")
    if cause is Cause.NO_WELCOME:
        return Decision("disconnected", False, "control plane sent no welcome")
    if cause is Cause.INVALID_WELCOME:
        # Normal backoff, unlike a protocol mismatch: a control plane mid-deploy may send
        # one bad welcome and a good one on the next dial.
        return Decision("disconnected", False, "control plane sent an invalid welcome")
    if cause is Cause.KEEPALIVE:
        return Decision("disconnected", False, "control plane stopped answering pings")
    if cause is Cause.LOCAL:
        return Decision("disconnected", False, "agent-side error")
    return Decision("disconnected", False, "control plane unreachable")


class Backoff:
    """Exponential backoff with full jitter (AWS architecture blog's "Full Jitter").

    ``next_delay`` returns a delay in ``[0, min(max_s, initial_s * 2**attempt))``; with
    ``at_max`` (persistent failures) one in ``[max_s, 1.1 * max_s)``; with ``soon`` (the
    control plane's clean goodbye) one in ``[0, min(REDIAL_SOON_S, initial_s))``, and
    the failures before it are forgotten. Reset after a
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

    def next_delay(self, *, at_max: bool = False, soon: bool = False) -> float:
        if soon:
            # The path worked until the control plane chose to close it: the failures
            # counted before say nothing about the control plane that comes back.
            self.attempt = 0
            delay = min(REDIAL_SOON_S, self.ceiling()) * self._rand()
        elif at_max:
            # Persistent failures wait the full maximum, never less, plus up to 10 %
            # so that a fleet refused at once does not come back at once.
            delay = self.max_s * (1.0 + 0.1 * self._rand())
        else:
            delay = self.ceiling() * self._rand()
        self.attempt += 1
        return delay

    def session_ended(self, lasted_s: float) -> None:
        """Forget earlier failures after a session that proved the path works.

        ``lasted_s`` counts from the ``welcome`` (0 for a session that never got one): a
        dial that hangs in the handshake for longer than ``max_s`` proves nothing.
        """
        if lasted_s > self.max_s:
            self.attempt = 0
