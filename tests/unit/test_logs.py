"""Registered secrets never reach a log line, whichever way they travel."""

from __future__ import annotations

import io
import logging

import structlog

from agent import logs

TOKEN = "tok-9f8e7d6c5b4a3210"


def test_token_is_scrubbed_from_structlog_and_stdlib_lines() -> None:
    stream = io.StringIO()
    logs.configure("debug", "json", stream=stream)
    logs.redact(TOKEN + "\n")
    log = structlog.get_logger("t")
    log.info("dialing", header=f"Bearer {TOKEN}")
    try:
        raise ValueError(f"server said {TOKEN} is bad")
    except ValueError:
        log.exception("failed")
    logging.getLogger("websockets.client").warning("upgrade with %s", TOKEN)
    text = stream.getvalue()
    assert "dialing" in text and "failed" in text and "upgrade with" in text
    assert TOKEN not in text
    assert "[redacted]" in text


def test_console_format_renders_plain_text() -> None:
    stream = io.StringIO()
    logs.configure("info", "console", stream=stream)
    structlog.get_logger("t").info("hello_there", n=1)
    structlog.get_logger("t").debug("not_shown")
    assert "hello_there" in stream.getvalue()
    assert "not_shown" not in stream.getvalue()
    assert not stream.getvalue().lstrip().startswith("{")
