"""The link to the control plane: the only module that imports ``websockets``.

:class:`Connection` dials ``control_plane.url`` with the ``cloudbender-agent.v1``
subprotocol and the bearer token, runs one :class:`~agent.protocol.session.Session` per
connection (hello, welcome, heartbeats, error answers), hands application messages to a
:class:`SessionHandler`, and reconnects with full-jitter backoff. How each failure is
retried is decided by :func:`agent.protocol.retry.classify`, nowhere else.

The token is read from its file at every dial (so a rotated token is picked up without a
restart), registered with the log scrubber, and sent only in the upgrade request.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import ssl
import time
from collections.abc import Callable
from typing import Any, Protocol

import structlog
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.typing import Subprotocol

from agent import logs
from agent.config import ControlPlaneConfig
from agent.health.facts import ControlPlaneFacts
from agent.protocol import MAX_HEADER, MAX_INCOMING_FRAME, SUBPROTOCOL
from agent.protocol import messages as m
from agent.protocol import session as s
from agent.protocol.retry import Backoff, Cause, Decision, classify

log = structlog.get_logger(__name__)

KEEPALIVE_S = 20.0  # PROTOCOL.md §1: ping every 20 s, no pong in 20 s ends the session
OPEN_TIMEOUT_S = 15.0
WELCOME_TIMEOUT_S = 30.0
CLOSE_TIMEOUT_S = 5.0


class Link(Protocol):
    """What a handler may do with the established session."""

    async def send(self, message: dict[str, Any]) -> None: ...

    async def send_binary(self, header: dict[str, Any], payload: bytes | memoryview) -> None: ...


class SessionHandler(Protocol):
    """The application side (jobs, results, artifacts) of a session.

    Callbacks run on the receive path: they must return quickly and leave long work to
    tasks of their own, or the session stops reading (and keepalive pongs are delayed).
    """

    def hello_jobs(self) -> list[dict[str, str]]: ...

    async def on_established(self, link: Link) -> None: ...

    async def on_message(self, link: Link, message: m.Incoming) -> None: ...

    async def on_invalid_assignment(self, link: Link, job_id: str, detail: str) -> None: ...

    async def on_peer_error(self, link: Link, error: s.PeerError) -> None: ...

    def on_closed(self) -> None: ...


class _Ended(Exception):
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
        stats: s.Stats,
        user_agent: str,
        backoff: Backoff | None = None,
    ) -> None:
        self._config = config
        self._hello = hello
        self._telemetry = telemetry
        self._handler = handler
        self._publish = publish
        self._stats = stats
        self._user_agent = user_agent
        self._backoff = backoff or Backoff(config.reconnect.initial_s, config.reconnect.max_s)
        self.facts = ControlPlaneFacts(configured=True, state="disconnected")
        self._ws: ClientConnection | None = None
        self._session: s.Session | None = None
        self._send_lock = asyncio.Lock()
        self._last_frame_at: float | None = None

    # -- the dial loop ------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            self._update(state="connecting", attempts=self.facts.attempts + 1, next_attempt_at=None)
            started = time.monotonic()
            try:
                await self._connect_once()
                ended = _Ended(Cause.CLOSED)
            except _Ended as exc:
                ended = exc
            except Exception as exc:
                # A bug of ours (or a handler's) must cost one session, not the agent's
                # link to its control plane.
                log.exception("control_plane_session_failed")
                ended = _Ended(Cause.LOCAL, detail=type(exc).__name__)
            lasted = time.monotonic() - started
            self._backoff.session_ended(lasted)
            decision = classify(
                ended.cause, http_status=ended.http_status, close_code=ended.close_code
            )
            words = decision.words + (f": {ended.detail}" if ended.detail else "")
            delay = self._backoff.next_delay(at_max=decision.at_max_backoff)
            self._disconnected(decision, words, delay)
            await asyncio.sleep(delay)

    def _disconnected(self, decision: Decision, words: str, delay: float) -> None:
        log.warning(
            "control_plane_disconnected",
            state=decision.state,
            reason=words,
            retry_in_s=round(delay, 2),
        )
        self._update(
            state=decision.state,
            since=time.time(),
            last_error=words,
            session_id=None,
            backoff_s=round(delay, 3),
            next_attempt_at=time.time() + delay,
            last_contact=self._last_frame_at or self.facts.last_contact,
        )

    async def _connect_once(self) -> None:
        try:
            token = _read_token(self._config)
        except OSError as exc:
            raise _Ended(Cause.LOCAL, detail=f"token file unreadable ({exc.strerror})") from exc
        try:
            async with connect(
                self._config.url,
                subprotocols=[Subprotocol(SUBPROTOCOL)],
                additional_headers={"Authorization": f"Bearer {token}"},
                user_agent_header=self._user_agent,
                ssl=_tls_context(self._config),
                compression=None,  # results are bulk bytes; deflate costs CPU, saves little
                open_timeout=OPEN_TIMEOUT_S,
                ping_interval=KEEPALIVE_S,
                ping_timeout=KEEPALIVE_S,
                close_timeout=CLOSE_TIMEOUT_S,
                max_size=MAX_INCOMING_FRAME + MAX_HEADER + 4,
            ) as ws:
                await self._run_session(ws)
        except InvalidStatus as exc:
            raise _Ended(Cause.HTTP_STATUS, http_status=exc.response.status_code) from exc
        except InvalidHandshake as exc:
            raise _Ended(Cause.UNREACHABLE, detail=f"handshake failed ({exc})") from exc
        except ConnectionClosed as exc:
            raise _closed(exc) from exc
        except (OSError, TimeoutError) as exc:
            raise _Ended(Cause.UNREACHABLE, detail=_os_words(exc)) from exc
        except ValueError as exc:
            # websockets refuses header values with control characters; do not say more,
            # the value is the token.
            raise _Ended(Cause.LOCAL, detail="the token file holds an invalid token") from exc

    # -- one session ----------------------------------------------------------------------

    async def _run_session(self, ws: ClientConnection) -> None:
        if ws.subprotocol != SUBPROTOCOL:
            await ws.close(1002, "subprotocol cloudbender-agent.v1 required")
            raise _Ended(Cause.NO_SUBPROTOCOL)
        session = s.Session(self._hello(self._handler.hello_jobs()), self._stats)
        self._ws, self._session = ws, session
        heartbeats: asyncio.Task[None] | None = None
        try:
            session.initiate()
            await self._flush()
            async with asyncio.timeout(WELCOME_TIMEOUT_S) as welcome_deadline:
                while session.state is not s.State.ESTABLISHED:
                    await self._receive_one(ws, session)
                welcome_deadline.reschedule(None)
            assert session.heartbeat_s is not None
            heartbeats = asyncio.create_task(
                self._heartbeats(session.heartbeat_s), name="heartbeat"
            )
            await self._handler.on_established(self)
            while True:
                await self._receive_one(ws, session)
        except TimeoutError as exc:
            await ws.close(1002, "no welcome")
            raise _Ended(Cause.NO_WELCOME) from exc
        finally:
            if heartbeats is not None:
                heartbeats.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await heartbeats
            session.close()
            self._ws, self._session = None, None
            self._handler.on_closed()

    async def _receive_one(self, ws: ClientConnection, session: s.Session) -> None:
        frame = await ws.recv()
        self._last_frame_at = time.time()
        if isinstance(frame, str):
            events = session.receive_text(frame)
        else:
            events = session.receive_binary(frame)
        await self._flush()
        for event in events:
            await self._dispatch(ws, event)

    async def _dispatch(self, ws: ClientConnection, event: s.Event) -> None:
        if isinstance(event, s.Welcomed):
            log.info(
                "control_plane_connected", session=event.session, heartbeat_s=event.heartbeat_s
            )
            self._update(
                state="connected",
                since=time.time(),
                session_id=event.session,
                last_contact=time.time(),
                last_error=None,
                backoff_s=None,
                next_attempt_at=None,
            )
        elif isinstance(event, s.Received):
            await self._handler.on_message(self, event.message)
        elif isinstance(event, s.InvalidAssignment):
            await self._handler.on_invalid_assignment(self, event.job_id, event.detail)
        elif isinstance(event, s.PeerError):
            log.warning("control_plane_error", code=event.code, detail=event.detail, ref=event.ref)
            await self._handler.on_peer_error(self, event)
        elif isinstance(event, s.Answered):
            log.warning("control_plane_bad_frame", answered=event.code, detail=event.detail)
        elif isinstance(event, s.Ignored):
            log.info("control_plane_frame_ignored", why=event.why)
        elif isinstance(event, s.Fatal):
            await ws.close(1000, event.code)
            raise _Ended(Cause.UNSUPPORTED_PROTOCOL, detail=event.detail)

    async def _heartbeats(self, interval_s: float) -> None:
        while True:
            session = self._session
            if session is None:
                return
            session.heartbeat(time.time(), self._telemetry(self._handler.hello_jobs()))
            await self._flush()
            self._update(last_contact=self._last_frame_at or self.facts.last_contact)
            await asyncio.sleep(interval_s)

    # -- Link ----------------------------------------------------------------------------

    async def send(self, message: dict[str, Any]) -> None:
        """Send an application message. Raises :class:`SessionError` when not established."""
        if self._session is None:
            raise s.SessionError(f"cannot send {message.get('type')}: not connected")
        self._session.send(message)
        await self._flush()

    async def send_binary(self, header: dict[str, Any], payload: bytes | memoryview) -> None:
        if self._session is None:
            raise s.SessionError(f"cannot send {header.get('type')}: not connected")
        self._session.send_binary(header, payload)
        await self._flush()

    async def _flush(self) -> None:
        # One writer at a time keeps frames in the order the session queued them.
        async with self._send_lock:
            session, ws = self._session, self._ws
            if session is None or ws is None:
                return
            for frame in session.data_to_send():
                await ws.send(frame)

    def _update(self, **changes: Any) -> None:
        self.facts = dataclasses.replace(self.facts, **changes)
        self._publish(self.facts)


def _closed(exc: ConnectionClosed) -> _Ended:
    if exc.rcvd is not None:
        return _Ended(Cause.CLOSED, close_code=exc.rcvd.code, detail=exc.rcvd.reason or None)
    if exc.sent is not None and exc.sent.code == 1011:
        return _Ended(Cause.KEEPALIVE)
    return _Ended(Cause.CLOSED)


def _os_words(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc}"
    if isinstance(exc, OSError) and exc.errno:
        # asyncio words refusals as "Connect call failed ('127.0.0.1', 9)"; the errno
        # says it plainly.
        return os.strerror(exc.errno).lower()
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return type(exc).__name__


def _read_token(config: ControlPlaneConfig) -> str:
    token = config.token_file.read_text(encoding="utf-8").strip()
    logs.redact(token)
    return token


def _tls_context(config: ControlPlaneConfig) -> ssl.SSLContext | None:
    if not config.url.startswith("wss://"):
        return None
    context = ssl.create_default_context()  # the system trust store
    if config.ca_file is not None:
        context.load_verify_locations(cafile=str(config.ca_file))
    if config.client_cert is not None:
        key = str(config.client_key) if config.client_key is not None else None
        context.load_cert_chain(str(config.client_cert), key)
    return context
