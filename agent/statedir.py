"""The state directory: created root-only, and probed for writability (health facts)."""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

from agent.health.facts import Problem


def prepare_state_dir(path: Path) -> Problem | None:
    """Create the state directory (mode 0700) if needed; return a problem or None."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        return Problem(
            "state_dir_unwritable",
            f"state directory {path} cannot be created: {exc.strerror}",
            restart_helps=True,
        )
    return check_state_dir(path)


def check_state_dir(path: Path) -> Problem | None:
    """Write, fsync and remove a probe file; return a problem or None.

    A full disk is reported but does not starve the watchdog: restarting would not free
    space, and the agent must keep serving (DESIGN.md §5). Any other write failure
    (read-only remount, I/O error) is one a restart may cure.
    """
    probe = path / f".probe-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"ok")
            os.fsync(fd)
        finally:
            os.close(fd)
        probe.unlink()
    except OSError as exc:
        with contextlib.suppress(OSError):
            probe.unlink()
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return Problem("state_dir_full", f"state directory {path} is full: {exc.strerror}")
        return Problem(
            "state_dir_unwritable",
            f"state directory {path} is not writable: {exc.strerror}",
            restart_helps=True,
        )
    return None
