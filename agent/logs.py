"""structlog setup: JSON lines for journald, or a console renderer for people.

Secrets registered with :func:`redact` are replaced in every rendered line, whatever
field or message they end up in: the control-plane token must never reach a log even
if a library puts it in an exception text.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

_SECRETS: set[str] = set()
_MASK = "[redacted]"
# A secret shorter than this would mask ordinary words; tokens are long.
_MIN_SECRET_LEN = 8


def redact(secret: str) -> None:
    """Register ``secret`` so that it never appears in a log line. Idempotent."""
    secret = secret.strip()
    if len(secret) >= _MIN_SECRET_LEN:
        _SECRETS.add(secret)


def scrub(text: str) -> str:
    """``text`` with every registered secret masked."""
    for secret in _SECRETS:
        if secret in text:
            text = text.replace(secret, _MASK)
    return text


def _scrub_processor(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> str:
    # Runs after the renderer, on the final line, so that nested values and exception
    # texts are covered too.
    return scrub(event) if isinstance(event, str) else event  # type: ignore[return-value]


def configure(level: str = "info", fmt: str = "json", stream: TextIO | None = None) -> None:
    """Configure structlog and the stdlib root logger. Safe to call again (reload)."""
    stream = stream or sys.stderr
    numeric = logging.getLevelName(level.upper())
    renderer: Any
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())
    else:
        renderer = structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            structlog.processors.UnicodeDecoder(),
            renderer,
            _scrub_processor,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    # Libraries (docker, websockets) log through the stdlib: keep them quiet unless
    # debugging, and route what they say through the same scrubber.
    handler = logging.StreamHandler(stream)
    handler.setFormatter(_ScrubbingFormatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric if level == "debug" else logging.WARNING)


class _ScrubbingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return scrub(super().format(record))
