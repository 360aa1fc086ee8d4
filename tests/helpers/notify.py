"""Reading what the agent tells systemd on a test's ``NOTIFY_SOCKET``."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

from tests.helpers.env import seconds


def messages_until(
    sock: socket.socket, done: Callable[[str], bool], timeout: float, what: str
) -> list[str]:
    """Every datagram received until one for which ``done`` is true (then included).
    Fails naming ``what`` and what did arrive after ``timeout`` (scaled) seconds."""
    messages: list[str] = []
    deadline = time.monotonic() + seconds(timeout)
    while time.monotonic() < deadline:
        try:
            message = sock.recv(4096).decode()
        except TimeoutError:
            continue
        messages.append(message)
        if done(message):
            return messages
    raise AssertionError(f"{what} never arrived within {timeout} s; got {messages}")


def statuses(messages: list[str]) -> list[str]:
    """The ``STATUS=`` values in ``messages``, in order."""
    return [line[7:] for m in messages for line in m.splitlines() if line.startswith("STATUS=")]
