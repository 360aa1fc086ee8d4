"""structlog setup: JSON lines for journald, or a console renderer for people.

Secrets registered with :func:`redact` are replaced in every rendered line, whatever
field or message they end up in: the control-plane token must never reach a log even
if a library puts it in an exception text. A line holds a secret as written, or escaped
by the JSON renderer or by ``repr`` (a ``"`` or ``\\`` in a token): all three forms are
masked.

:class:`Throttle` bounds lines that a peer can cause at will (one per frame it sends).

A value in a log line may be a peer's or a job's string (a job id, a result file's
name, a close reason). The JSON renderer escapes every control character. The console
renderer is told to ``repr`` every value, strings too (by default it prints a string
without spaces as it is); the event and a traceback, which it prints as they are, are
escaped first (:func:`agent.escaping.escape`): an ``ESC`` or ``\\n`` from a peer cannot
rewrite the terminal or start a forged line. A traceback keeps its own newlines.

The stdlib's records (websockets, docker, urllib3, asyncio) go through the same
processors and renderer as the agent's own lines: one format per run, JSON or console.

When the stream is the journal (systemd's ``$JOURNAL_STREAM`` names its device and
inode), each line starts with its syslog priority, ``<3>`` for an error, which journald
strips and records: ``journalctl -p err`` finds the agent's errors. Anywhere else no
prefix is written, so that a JSON line stays one JSON object.
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import time
import types
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from typing import Any, TextIO

import structlog

from agent.escaping import escape

_SECRETS: set[str] = set()
_MASK = "[redacted]"
# A shorter secret would mask ordinary words. The agent refuses tokens shorter than 16
# characters (agent.token_file), so this only guards against misuse.
_MIN_SECRET_LEN = 4


def redact(secret: str) -> None:
    """Register ``secret`` so that it never appears in a log line. Idempotent.

    Secrets shorter than 4 characters are not registered: they would mask words.
    """
    secret = secret.strip()
    if len(secret) < _MIN_SECRET_LEN:
        return
    _SECRETS.add(secret)
    _SECRETS.add(json.dumps(secret)[1:-1])
    _SECRETS.add(repr(secret)[1:-1])


def scrub(text: str) -> str:
    """``text`` with every registered secret (and its escaped forms) masked."""
    # Longest first, so that an escaped form is masked whole, not half.
    for secret in sorted(_SECRETS, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, _MASK)
    return text


def _scrub_processor(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> str:
    # Runs after the renderer, on the final line, so that nested values and exception
    # texts are covered too.
    return scrub(event) if isinstance(event, str) else event  # type: ignore[return-value]


# What the console renderer prints without repr; tracebacks keep their newlines.
_RAW_KEYS = {"event": "", "exception": "\n", "stack": "\n"}


def _escape_raw(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> Any:
    for key, keep in _RAW_KEYS.items():
        if isinstance(event.get(key), str):
            event[key] = escape(event[key], keep=keep)
    return event


def _drop_none(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> Any:
    # Console lines are read by people: `error=None` says nothing. JSON keeps every key,
    # so that a parser sees the same fields on every line of one event.
    for key in [k for k, v in event.items() if v is None]:
        del event[key]
    return event


# syslog(3) priorities, as journald reads them from a "<N>" line prefix.
_PRIORITY = {"critical": 2, "exception": 3, "error": 3, "warning": 4, "warn": 4, "debug": 7}
_INFO = 6


def is_journal(stream: TextIO) -> bool:
    """Whether ``stream`` is the journal stream systemd connected (sd_journal_stream_fd).

    ``$JOURNAL_STREAM`` is ``DEVICE:INODE`` of the socket systemd gave as stdout/stderr;
    a child whose stderr was redirected inherits the variable but not the socket, so
    the descriptor itself is compared.
    """
    try:
        device, inode = (int(x) for x in os.environ.get("JOURNAL_STREAM", "").split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError, io.UnsupportedOperation):
        return False
    return (st.st_dev, st.st_ino) == (device, inode)


def _with_priority(renderer: Any) -> Any:
    def render(logger: Any, method: str, event: MutableMapping[str, Any]) -> str:
        prefix = f"<{_PRIORITY.get(str(event.get('level', method)), _INFO)}>"
        line = str(renderer(logger, method, event))
        # Every line of a traceback: journald gives an unprefixed line priority 6.
        return "\n".join(prefix + part for part in line.split("\n"))

    return render


def configure(level: str = "info", fmt: str = "json", stream: TextIO | None = None) -> None:
    """Configure structlog and the stdlib root logger. Safe to call again (reload).

    Both go through one renderer: in ``json`` mode every line written to ``stream`` is
    one JSON object (``event``, ``level``, ``timestamp``; a library's line also
    ``logger``, e.g. ``websockets.client``), whoever logged it; Python warnings and
    the traceback of an uncaught exception (``crashed``) go the same way. Console mode
    leaves out keys whose value is ``None``. Secrets are masked in both. Lines carry a
    ``<N>`` priority prefix only when ``stream`` is the journal (:func:`is_journal`).
    """
    stream = stream or sys.stderr
    numeric = logging.getLevelName(level.upper())
    renderer: Any
    console: list[Any] = []
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty(), repr_native_str=True)
        console = [_drop_none, _escape_raw]
    else:
        renderer = structlog.processors.JSONRenderer()
    if is_journal(stream):
        renderer = _with_priority(renderer)
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    rendering = [
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
        structlog.processors.UnicodeDecoder(),
        *console,
        renderer,
        _scrub_processor,
    ]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            timestamper,
            *rendering,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        # One write() a line (PrintLogger writes the text and the newline apart): the
        # stdlib handler below writes to the same stream from other threads, and a line
        # must never be split by another's.
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    # Libraries (docker, urllib3, websockets, asyncio) log through the stdlib: keep them
    # quiet unless debugging, and render what they say like the agent's own lines, so
    # that a JSON consumer never meets a line it cannot parse.
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.processors.add_log_level,
                structlog.stdlib.add_logger_name,
                timestamper,
            ],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *rendering],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric if level == "debug" else logging.WARNING)
    # A DeprecationWarning from a library would otherwise be a bare line on stderr.
    logging.captureWarnings(True)
    # So would the traceback of a crash: it becomes one `crashed` line in the same format.
    sys.excepthook = _log_crash


def _log_crash(
    kind: type[BaseException], exc: BaseException, tb: types.TracebackType | None
) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, exc, tb)
        return
    structlog.get_logger("agent").critical("crashed", exc_info=(kind, exc, tb))


@dataclass
class _Window:
    started: float
    admitted: int = 0
    dropped: int = 0


class Throttle:
    """At most ``limit`` log lines of each kind per ``window_s`` seconds; the rest counted.

    Pure bookkeeping; the caller logs. A peer that sends a frame per millisecond must
    not be able to fill the journal. Not thread-safe: one owner (a connection).
    """

    def __init__(
        self,
        limit: int = 10,
        window_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.window_s = window_s
        self._clock = clock
        self._windows: dict[str, _Window] = {}

    def admit(self, kind: str) -> int | None:
        """``None``: drop this line. Otherwise log it, with the returned number of lines
        of ``kind`` dropped since the last one logged (usually 0)."""
        now = self._clock()
        window = self._windows.setdefault(kind, _Window(now))
        if now - window.started >= self.window_s:
            window.started, window.admitted = now, 0
        if window.admitted >= self.limit:
            window.dropped += 1
            return None
        window.admitted += 1
        dropped, window.dropped = window.dropped, 0
        return dropped

    def drain(self) -> dict[str, int]:
        """Lines dropped per kind and not yet reported; the counts start again at 0."""
        out = {kind: w.dropped for kind, w in self._windows.items() if w.dropped}
        for window in self._windows.values():
            window.dropped = 0
        return out
