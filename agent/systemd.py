"""sd_notify(3) for ``Type=notify`` units, with the standard library only.

The protocol is one datagram per message, sent to the ``AF_UNIX`` socket named by
``$NOTIFY_SOCKET``: newline-separated ``KEY=value`` assignments. A name that starts with
``@`` is in the abstract namespace (the ``@`` stands for a leading NUL byte).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping, Sequence

import structlog

from agent.health.facts import NodeFacts, Problem

_log = structlog.get_logger(__name__)

# A newline would start a new assignment (``STATUS=x\nREADY=1``); a NUL ends the
# message early when systemd parses it.
_UNSAFE = str.maketrans({"\n": " ", "\r": " ", "\0": " "})


def _address(value: str) -> str | None:
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    return None  # unset, relative, or a transport we do not speak (vsock:)


def _watchdog_interval(environ: Mapping[str, str]) -> float | None:
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
        pid = environ.get("WATCHDOG_PID")
        if pid is not None and int(pid) != os.getpid():
            return None  # meant for another process (we were forked or exec'd by it)
    except ValueError:
        return None
    # systemd's advice: ping at half the timeout, so one late ping is not a restart.
    return usec / 2 / 1_000_000 if usec > 0 else None


def status_line(facts: NodeFacts, problems: Sequence[Problem]) -> str:
    """The ``STATUS=`` line that ``systemctl status`` shows: health, link, GPUs.

    The daemon sends it with every watchdog pass and at once when the control-plane
    link changes state, so that it never says "connecting" while the link is up.
    """
    gpus = len(facts.gpus.gpus) if facts.gpus else 0
    health = "healthy" if not problems else f"unhealthy: {problems[0].detail}"
    return f"{health}; control plane {facts.control_plane.state}; {gpus} GPU(s)"


class Notifier:
    """No-op when NOTIFY_SOCKET is unset.

    Every method may be called any number of times, from the event loop: sending never
    blocks and never raises. ``close`` is idempotent; a message sent after it opens a
    new socket. The environment is only read, never changed.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._name = env.get("NOTIFY_SOCKET", "")
        self._address = _address(self._name)
        self._interval = _watchdog_interval(env)
        self._sock: socket.socket | None = None
        self._failing = False

    @property
    def enabled(self) -> bool:
        return self._address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """How often to call :meth:`watchdog`, or ``None`` when no watchdog is armed."""
        return self._interval

    def ready(self, status: str | None = None) -> None:
        """Startup is finished: systemd starts ordering dependent units after this."""
        self._send("READY=1", status)

    def status(self, text: str) -> None:
        """One line for ``systemctl status``; newlines are replaced by spaces."""
        self._send(None, text)

    def watchdog(self) -> None:
        """The agent is healthy; call only when the health predicate says so."""
        self._send("WATCHDOG=1", None)

    def stopping(self, status: str | None = None) -> None:
        """Shutdown has begun: systemd disarms the watchdog and starts TimeoutStopSec."""
        self._send("STOPPING=1", status)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _send(self, state: str | None, status: str | None) -> None:
        if self._address is None:
            return
        lines = [] if state is None else [state]
        if status is not None:
            lines.append("STATUS=" + status.translate(_UNSAFE))
        message = "\n".join(lines).encode("utf-8", "replace")
        try:
            if self._sock is None:
                # Python sockets are close-on-exec, so the descriptor never reaches a child.
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                # A full receive queue must not stall the event loop; the message is dropped
                # instead, and a watchdog ping that keeps being dropped ends in a restart.
                self._sock.setblocking(False)
            self._sock.sendto(message, self._address)
        except OSError as exc:
            # Telling systemd is a courtesy, running jobs are not: if the socket is gone
            # (systemd re-executing, a test harness exiting) the agent keeps working.
            # Logged once per outage so that a 15 s watchdog ping does not flood journald.
            if not self._failing:
                _log.warning("sd_notify_failed", socket=self._name, error=str(exc))
            self._failing = True
            self.close()
        else:
            self._failing = False
