"""The link to the control plane: the only module that imports ``websockets``.

:class:`Connection` dials ``control_plane.url`` with the ``cloudbender-agent.v1``
subprotocol and the bearer token, runs one :class:`~agent.protocol.session.Session` per
connection (hello, welcome, heartbeats, error answers), hands application messages to a
:class:`SessionHandler`, and reconnects with full-jitter backoff. How each failure is
retried is decided by :func:`agent.protocol.retry.classify`, nowhere else.

At every dial the token is read from its file (a rotated one needs no restart) and
registered with the log scrubber, and the TLS context is built; the token is sent only
in the upgrade request. Neither it nor a handshake exception's text (which may quote
request headers) ever reaches ``/status``. No redirect is followed (a 3xx is a failed
dial); no proxy for ``ws://`` or a loopback host, the system's proxy settings otherwise.

Close codes the agent sends: 1000 after ``unsupported_protocol``; 1001 when the agent
stops; 1002 for a missing subprotocol, no ``welcome`` or an invalid one; 1011 when the
agent fails during the session (a heartbeat that cannot be built, a handler's bug) or a
pong is missing; websockets' own 1007 / 1009 for invalid UTF-8 / a frame over 16 MiB.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from typing import Any, Literal
from urllib.parse import urlsplit

import structlog
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import (
    ConnectionClosed,
    InvalidHandshake,
    InvalidProxy,
    InvalidStatus,
    InvalidURI,
)
from websockets.protocol import State as WebSocketState
from websockets.typing import Subprotocol

from agent import logs
from agent.config import ControlPlaneConfig, is_loopback_host
from agent.health.facts import ControlPlaneFacts
from agent.link import SessionHandler
from agent.link_report import LinkReport
from agent.protocol import MAX_INCOMING_FRAME, SUBPROTOCOL, messages
from agent.protocol.retry import (
    Backoff,
    Cause,
    Ended,
    classify,
    dial_failure_words,
    ended_by_close,
)
from agent.protocol.session import (
    Answered,
    Event,
    Fatal,
    Ignored,
    InvalidAssignment,
    PeerError,
    Received,
    Session,
    SessionError,
    SessionState,
    Stats,
    Welcomed,
)
from agent.tls import TlsSettingError, client_context
from agent.tls_failure import client_cert_refused, closed_before_answer, server_cert_refused
from agent.token_file import TokenFileError, read_token

log = structlog.get_logger(__name__)

KEEPALIVE_S = 20.0  # docs/protocol.md §1: ping every 20 s, no pong in 20 s ends the session
OPEN_TIMEOUT_S = 15.0
WELCOME_TIMEOUT_S = 30.0
CLOSE_TIMEOUT_S = 5.0
STOP_CLOSE_S = 2.0  # how long a stopping agent waits for the control plane's close frame


class _NoRedirects(connect):
    """websockets' ``connect`` that follows no redirect: a 3xx is a failed dial.

    A control plane's URL is configured, not discovered; a redirect could downgrade
    ``wss://`` to a proxy-visible path or carry the token to another origin's logs.
    """

    def process_redirect(self, exc: Exception) -> Exception | str:
        return exc


def proxy_for(url: str) -> Literal[True] | None:
    """websockets' ``proxy`` argument for ``url``: the system's (``True``) for ``wss://``
    to a non-loopback host; none for ``ws://`` (the proxy would read the token) or for a
    loopback host (a proxy cannot reach this machine's loopback)."""
    parts = urlsplit(url)
    if parts.scheme != "wss" or is_loopback_host(parts.hostname or ""):
        return None
    return True


class Connection:
    """Owns the dial loop. Run :meth:`run` as one task; cancel it to disconnect."""

    def __init__(
        self,
        config: ControlPlaneConfig,
        *,
        hello: Callable[[list[dict[str, str]]], dict[str, Any]],
        telemetry: Callable[[list[dict[str, str]]], dict[str, Any]],
        handler: SessionHandler,
        publish: Callable[[ControlPlaneFacts], None],
        stats: Stats,
        user_agent: str,
        backoff: Backoff | None = None,
    ) -> None:
        self._config = config
        self._hello = hello
        self._telemetry = telemetry
        self._handler = handler
        self._report = LinkReport(publish)
        self._stats = stats
        self._user_agent = user_agent
        self._backoff = backoff or Backoff(config.reconnect.initial_s, config.reconnect.max_s)
        self._ws: ClientConnection | None = None
        self._session: Session | None = None
        self._send_lock = asyncio.Lock()
        self._welcomed_at: float | None = None
        self._heartbeat_failure: Exception | None = None

    # -- the dial loop ------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            self._report.connecting()
            self._welcomed_at = None
            try:
                await self._connect_once()
                ended = Ended(Cause.CLOSED)
            except Ended as exc:
                ended = exc
            except Exception as exc:
                # A bug of ours must cost one dial, not the agent's link to its control plane.
                log.exception("control_plane_dial_failed")
                ended = Ended(Cause.LOCAL, detail=type(exc).__name__)
            welcomed = self._welcomed_at
            self._backoff.session_ended(0.0 if welcomed is None else time.monotonic() - welcomed)
            decision = classify(
                ended.cause,
                http_status=ended.http_status,
                close_code=ended.close_code,
                established=welcomed is not None,
            )
            words = decision.words + (f": {ended.detail}" if ended.detail else "")
            delay = self._backoff.next_delay(
                at_max=decision.at_max_backoff, soon=decision.redial_soon
            )
            # The link was up until this moment unless pongs had stopped: websockets ends
            # such a session only after KEEPALIVE_S without one.
            up_until_now = welcomed is not None and ended.cause is not Cause.KEEPALIVE
            self._report.disconnected(decision, words, delay, up_until_now=up_until_now)
            await asyncio.sleep(delay)

    async def _connect_once(self) -> None:
        ws = await dial(self._config, self._user_agent)
        try:
            await self._run_session(ws)
        except asyncio.CancelledError:
            await _close(ws, 1001, "agent stopping", STOP_CLOSE_S)
            raise
        except Ended:
            raise
        except ConnectionClosed as exc:
            failure = self._heartbeat_failure
            if failure is not None:
                detail = f"heartbeat failed ({type(failure).__name__})"
                raise Ended(Cause.LOCAL, detail=detail) from failure
            raise _ended_by_close(exc) from exc
        except Exception as exc:
            log.exception("control_plane_session_failed")
            await _close(ws, 1011, "agent error", CLOSE_TIMEOUT_S)
            raise Ended(Cause.LOCAL, detail=f"{type(exc).__name__} in the session") from exc
        finally:
            if ws.state is not WebSocketState.CLOSED:
                ws.transport.abort()

    # -- one session ----------------------------------------------------------------------

    async def _run_session(self, ws: ClientConnection) -> None:
        if ws.subprotocol != SUBPROTOCOL:
            await ws.close(1002, "subprotocol cloudbender-agent.v1 required")
            raise Ended(Cause.NO_SUBPROTOCOL)
        session = Session(self._hello(self._handler.hello_jobs()), self._stats)
        self._ws, self._session, self._heartbeat_failure = ws, session, None
        heartbeats: asyncio.Task[None] | None = None
        try:
            session.initiate()
            await self._flush()
            await self._await_welcome(ws, session)
            assert session.heartbeat_s is not None
            heartbeats = asyncio.create_task(
                self._heartbeats(ws, session, session.heartbeat_s), name="heartbeat"
            )
            await self._handler.on_established(self)
            while True:
                await self._receive_one(ws, session)
        finally:
            if heartbeats is not None:
                heartbeats.cancel()
                # Never re-raises: what ended the session is what propagates.
                await asyncio.gather(heartbeats, return_exceptions=True)
            session.close()
            self._ws, self._session = None, None
            self._handler.on_closed()

    async def _await_welcome(self, ws: ClientConnection, session: Session) -> None:
        deadline = asyncio.timeout(WELCOME_TIMEOUT_S)
        try:
            async with deadline:
                while session.state is not SessionState.ESTABLISHED:
                    await self._receive_one(ws, session)
        except TimeoutError as exc:
            if not deadline.expired():
                raise  # not the control plane's silence: a bug, reported as such
            await ws.close(1002, "no welcome")
            raise Ended(Cause.NO_WELCOME) from exc

    async def _receive_one(self, ws: ClientConnection, session: Session) -> None:
        frame = await ws.recv()
        if isinstance(frame, str):
            events = session.receive_text(frame)
        else:
            events = session.receive_binary(frame)
        await self._flush()
        for event in events:
            await self._dispatch(ws, event)

    async def _dispatch(self, ws: ClientConnection, event: Event) -> None:
        if isinstance(event, Welcomed):
            self._welcomed_at = time.monotonic()
            self._report.connected(event)
        elif isinstance(event, Received):
            await self._handler.on_message(self, event.message)
        elif isinstance(event, InvalidAssignment):
            await self._handler.on_invalid_assignment(self, event.job_id, event.detail)
        elif isinstance(event, PeerError):
            self._report.peer_event(event)
            await self._handler.on_peer_error(self, event)
        elif isinstance(event, (Answered, Ignored)):
            self._report.peer_event(event)
        elif isinstance(event, Fatal):
            text = None if event.detail is None else messages.printable(event.detail, 100)
            detail = None if text is None else text.encode("ascii", "replace").decode()  # ≤ 123 B
            if event.code == "invalid_welcome":
                await ws.close(1002, f"invalid welcome: {detail}")
                raise Ended(Cause.INVALID_WELCOME, detail=detail)
            await ws.close(1000, event.code)
            raise Ended(Cause.UNSUPPORTED_PROTOCOL, detail=detail)

    async def _heartbeats(self, ws: ClientConnection, session: Session, every_s: float) -> None:
        """Heartbeats from the ``welcome`` on; ends the session if one cannot be sent.

        A failure closes the socket with 1011, as websockets' keepalive does on a missing
        pong: the receive loop then sees the close and :meth:`_connect_once` reports this
        failure. Without that the session would stay "connected" while the control plane
        hears nothing and declares the node dead.
        """
        try:
            while True:
                session.heartbeat(time.time(), self._telemetry(self._handler.hello_jobs()))
                await self._flush()
                # The session is open, so websockets' keepalive pings are being answered
                # (it closes the socket after KEEPALIVE_S without a pong): contact, however
                # quiet the control plane is.
                self._report.in_contact()
                await asyncio.sleep(every_s)
        except ConnectionClosed:
            return  # the receive loop sees it too, and reports it
        except Exception as exc:
            log.exception("control_plane_heartbeat_failed")
            self._heartbeat_failure = exc
            await _close(ws, 1011, "heartbeat failed", CLOSE_TIMEOUT_S)

    # -- Link ----------------------------------------------------------------------------

    async def send(self, message: dict[str, Any]) -> None:
        """Send an application message. Raises :class:`SessionError` when not established."""
        if self._session is None:
            raise SessionError(f"cannot send {message.get('type')}: not connected")
        self._session.send(message)
        await self._flush()

    async def send_frame(self, type_: str, frame: bytes | memoryview) -> None:
        """Send a built binary frame; returns once websockets has masked it into its own
        copy, so the caller may then reuse ``frame``'s buffer."""
        if self._session is None:
            raise SessionError(f"cannot send {type_}: not connected")
        self._session.send_frame(type_, frame)
        await self._flush()

    async def _flush(self) -> None:
        # One writer at a time keeps frames in the order the session queued them.
        async with self._send_lock:
            session, ws = self._session, self._ws
            if session is None or ws is None:
                return
            for frame in session.data_to_send():
                await ws.send(frame)


async def dial(
    config: ControlPlaneConfig, user_agent: str, *, open_timeout_s: float = OPEN_TIMEOUT_S
) -> ClientConnection:
    """Open the WebSocket (TCP, TLS, the upgrade with the token), send nothing; raises
    :class:`Ended`. ``doctor`` dials alone: a ``hello`` would replace a running agent (4409)."""
    try:
        token = read_token(config.token_file)
        tls = None
        if config.scheme == "wss":
            tls = client_context(
                ca_file=config.ca_file,
                client_cert=config.client_cert,
                client_key=config.client_key,
            )
    except (TokenFileError, TlsSettingError) as exc:
        raise Ended(Cause.LOCAL, detail=str(exc)) from exc
    logs.redact(token)
    lost: list[BaseException] = []  # a TLS alert arrives as what the connection was lost with
    try:
        return await _NoRedirects(
            config.url,
            create_connection=_remembering(lost),
            subprotocols=[Subprotocol(SUBPROTOCOL)],
            additional_headers={"Authorization": f"Bearer {token}"},
            user_agent_header=user_agent,
            proxy=proxy_for(config.url),
            ssl=tls,
            compression=None,  # results are bulk bytes; deflate costs CPU, saves little
            open_timeout=open_timeout_s,
            ping_interval=KEEPALIVE_S,
            ping_timeout=KEEPALIVE_S,
            close_timeout=CLOSE_TIMEOUT_S,
            max_size=MAX_INCOMING_FRAME,  # docs/protocol.md §1, the whole frame
        )
    except InvalidStatus as exc:
        raise Ended(Cause.HTTP_STATUS, http_status=exc.response.status_code) from exc
    except InvalidHandshake as exc:
        if tls is not None:
            tls_ended = client_cert_refused(lost[0] if lost else None, config.client_cert)
            if tls_ended is None and isinstance(exc.__cause__, EOFError):
                tls_ended = closed_before_answer(config.client_cert)
            if tls_ended is not None:
                raise tls_ended from exc
        # Only the type: the text of some (InvalidHeaderValue) quotes the headers sent.
        detail = f"handshake failed ({type(exc).__name__})"
        raise Ended(Cause.UNREACHABLE, detail=detail) from exc
    except ssl.SSLCertVerificationError as exc:
        raise server_cert_refused(exc, config.ca_file) from exc
    except (OSError, TimeoutError) as exc:
        raise Ended(Cause.UNREACHABLE, detail=dial_failure_words(exc)) from exc
    except (InvalidURI, InvalidProxy, ValueError) as exc:
        # A bad proxy setting in the environment, or a URL websockets will not dial.
        detail = f"cannot dial ({type(exc).__name__})"
        raise Ended(Cause.LOCAL, detail=detail) from exc


def _remembering(lost: list[BaseException]) -> type[ClientConnection]:
    """A connection class that appends to ``lost`` the error its transport died of."""

    class _Remembering(ClientConnection):
        def connection_lost(self, exc: Exception | None) -> None:
            if exc is not None:
                lost.append(exc)
            super().connection_lost(exc)

    return _Remembering


async def _close(ws: ClientConnection, code: int, reason: str, within_s: float) -> None:
    """Close with ``code``; abort if the peer has not answered within ``within_s``.

    Raises nothing but ``CancelledError`` (a second stop signal cancels at once).
    """
    closing = asyncio.ensure_future(ws.close(code, reason))
    try:
        await asyncio.wait({closing}, timeout=within_s)
    finally:
        if not closing.done():
            closing.cancel()
            ws.transport.abort()
        elif not closing.cancelled():
            closing.exception()  # retrieved: a failed close changes nothing here


def _ended_by_close(exc: ConnectionClosed) -> Ended:
    sent = None if exc.sent is None else (exc.sent.code, exc.sent.reason)
    rcvd = None if exc.rcvd is None else (exc.rcvd.code, exc.rcvd.reason)
    return ended_by_close(sent, rcvd, sent_first=exc.rcvd_then_sent is False)
