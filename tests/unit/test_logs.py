"""Registered secrets never reach a log line, whichever way they travel."""

from __future__ import annotations

import io
import json
import logging
import sys
import threading
from pathlib import Path

import pytest
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


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_a_token_with_quotes_or_backslashes_is_scrubbed_escaped_too(fmt: str) -> None:
    token = 'tok"with\\escapes-0123456789'
    stream = io.StringIO()
    logs.configure("info", fmt, stream=stream)
    logs.redact(token)
    structlog.get_logger("t").info("dialing", header=f"Bearer {token}", nested={"t": token})
    text = stream.getvalue()
    assert "dialing" in text
    for form in (token, json.dumps(token)[1:-1], repr(token)[1:-1], "with\\\\escapes"):
        assert form not in text, (form, text)
    assert "[redacted]" in text


def test_secrets_of_four_characters_are_redacted_shorter_are_not() -> None:
    logs.redact("abcd")
    logs.redact("xy")
    assert logs.scrub("key abcd and xy") == "key [redacted] and xy"


def test_throttle_admits_a_few_per_window_and_counts_the_rest() -> None:
    now = [0.0]
    throttle = logs.Throttle(limit=3, window_s=60.0, clock=lambda: now[0])
    assert [throttle.admit("a") for _ in range(3)] == [0, 0, 0]
    assert [throttle.admit("a") for _ in range(5)] == [None] * 5
    assert throttle.admit("b") == 0  # kinds are counted apart
    now[0] = 61.0
    assert throttle.admit("a") == 5  # the first line of a new window says how many were dropped
    assert throttle.drain() == {}
    for _ in range(4):
        throttle.admit("a")
    assert throttle.drain() == {"a": 2}
    assert throttle.drain() == {}


def test_console_lines_escape_control_characters_from_peers() -> None:
    """Attack: a peer's string in a log value (a result name, a job id, a close reason)
    with `ESC[1A ESC[2K` or a newline rewrote the operator's terminal or forged a log
    line; console logs printed it raw (JSON lines were already escaped)."""
    csi = "\x1b[1A\x1b[2K"
    stream = io.StringIO()
    logs.configure("info", "console", stream=stream)
    log = structlog.get_logger("t")
    log.info("job_failed", job_id=f"j{csi}", error=f"bad name\n{csi}forged_line ok=1")
    try:
        raise ValueError(f"peer said {csi}")
    except ValueError:
        log.exception("crashed")
    logging.getLogger("websockets.client").warning("reason %s", f"bye{csi}\u202e")
    text = stream.getvalue()
    assert "\x1b" not in text and "\u202e" not in text, text
    assert "j\\x1b[1A\\x1b[2K" in text and "bad name\\n" in text
    assert "Traceback (most recent call last):\n" in text  # tracebacks keep their lines
    assert "bye\\x1b[1A\\x1b[2K\\u202e" in text
    assert not any(line.startswith("forged_line") for line in text.splitlines())


def test_json_mode_renders_library_lines_as_json_too() -> None:
    """Attack (on the operator's pipeline): in json mode a library's line (websockets,
    docker, urllib3, asyncio) was printed as `WARNING websockets.client: ...`, so a log
    shipper that parses every journal line as JSON dropped or choked on it, and a
    traceback from a library spread over lines that were not JSON either."""
    stream = io.StringIO()
    logs.configure("debug", "json", stream=stream)
    structlog.get_logger("t").info("agent_line", job_id="j1")
    logging.getLogger("websockets.client").debug("> GET %s HTTP/1.1", "/agent/v1")
    logging.getLogger("urllib3.connectionpool").warning("Retrying (%d)", 3)
    try:
        raise ConnectionRefusedError("engine said no\nsecond line")
    except ConnectionRefusedError:
        logging.getLogger("docker.api").exception("call failed")
    lines = stream.getvalue().splitlines()
    events = [json.loads(line) for line in lines]  # every line, not only most
    assert len(events) == 4, lines
    by_event = {e["event"]: e for e in events}
    assert by_event["> GET /agent/v1 HTTP/1.1"]["logger"] == "websockets.client"
    assert by_event["> GET /agent/v1 HTTP/1.1"]["level"] == "debug"
    assert by_event["Retrying (3)"]["level"] == "warning"
    failed = by_event["call failed"]
    assert failed["level"] == "error" and failed["logger"] == "docker.api"
    assert "ConnectionRefusedError: engine said no" in failed["exception"]
    assert all("timestamp" in e for e in events)


def test_library_lines_stay_quiet_below_warning_unless_debugging() -> None:
    stream = io.StringIO()
    logs.configure("info", "json", stream=stream)
    logging.getLogger("websockets.client").info("= connection is CONNECTING")
    logging.getLogger("docker.api").warning("engine slow")
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [e["event"] for e in events] == ["engine slow"]


def test_console_mode_leaves_out_keys_without_a_value() -> None:
    """Attack (on the operator's attention): console lines were padded with `error=None
    exit_code=None`, noise that hid the fields that did say something."""
    stream = io.StringIO()
    logs.configure("info", "console", stream=stream)
    structlog.get_logger("t").info("job_finished", job_id="j1", error=None, exit_code=0)
    text = stream.getvalue()
    assert "job_finished" in text and "exit_code=0" in text and "job_id='j1'" in text
    assert "None" not in text and "error" not in text, text
    json_stream = io.StringIO()
    logs.configure("info", "json", stream=json_stream)
    structlog.get_logger("t").info("job_finished", error=None)
    assert json.loads(json_stream.getvalue())["error"] is None  # JSON keeps its fields


def test_a_crash_is_one_json_line_too() -> None:
    """Attack (on the site's log pipeline): an unexpected exception that ended the process
    printed Python's multi-line traceback, the one event an operator most needs, as lines
    a JSON collector could not parse."""
    stream = io.StringIO()
    logs.configure("info", "json", stream=stream)
    try:
        raise RuntimeError("boom")
    except RuntimeError as exc:
        sys.excepthook(type(exc), exc, exc.__traceback__)
    (line,) = stream.getvalue().splitlines()
    event = json.loads(line)
    assert (event["event"], event["level"]) == ("crashed", "critical")
    assert "RuntimeError: boom" in event["exception"]


def test_lines_from_threads_writing_at_once_are_never_split(tmp_path: Path) -> None:
    """Attack (seen in CI): the health server's thread and the main loop logged at the
    same moment, and two JSON objects landed on one line (the agent's own lines were
    written as text, then newline, while a library's line went in between): a JSON
    consumer dropped both."""
    path = tmp_path / "agent.log"
    # As the unit runs it (PYTHONUNBUFFERED): every write() goes straight to the file.
    with io.TextIOWrapper(path.open("wb", buffering=0), write_through=True) as stream:
        logs.configure("debug", "json", stream)
        ours, library = structlog.get_logger("t"), logging.getLogger("websockets.client")

        def agent_lines() -> None:
            for i in range(3000):
                ours.debug("health_request", line=f"GET /healthz {i}")

        def library_lines() -> None:
            for i in range(3000):
                library.debug("> GET /agent/v1 %d", i)

        threads = [threading.Thread(target=agent_lines), threading.Thread(target=library_lines)]
        interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)  # threads take turns between any two writes
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        finally:
            sys.setswitchinterval(interval)
            logs.configure("info", "json", io.StringIO())
    lines = path.read_text().splitlines()
    assert len(lines) == 6000
    for line in lines:
        json.loads(line)
