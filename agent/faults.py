"""Crash points for crash-consistency tests: a named place where the agent can be killed.

``crash_point("spool.manifest_written")`` does nothing unless the environment variable
``CLOUDBENDER_AGENT_CRASH_AT`` names that point, in which case the process sends itself
SIGKILL there, exactly as ``kill -9`` from outside would at that instant, with no
cleanup, no ``finally`` and no flushed buffers. Tests use it to stop the agent at each
boundary of a multi-step write without racing a timer against it.

A point may carry a count: ``spool.file_copied:2`` kills at the second time the point is
reached. Read once, at import; production never sets the variable.
"""

from __future__ import annotations

import os
import signal

ENV = "CLOUDBENDER_AGENT_CRASH_AT"


def _parse(value: str | None) -> tuple[str, int] | None:
    if not value:
        return None
    name, _, count = value.partition(":")
    try:
        return name, max(1, int(count)) if count else 1
    except ValueError:
        return name, 1


_TARGET = _parse(os.environ.get(ENV))
_seen = 0


def crash_point(name: str) -> None:
    """SIGKILL this process here if ``CLOUDBENDER_AGENT_CRASH_AT`` names ``name``."""
    global _seen
    if _TARGET is None or _TARGET[0] != name:
        return
    _seen += 1
    if _seen >= _TARGET[1]:
        os.kill(os.getpid(), signal.SIGKILL)
