"""The state directory: made the agent's alone at start, and probed for writability.

It holds the job store (a job's ``env`` carries a provider's secrets), the audit
ledger, the spool and the model cache: nobody but the agent's user may read it. Under
systemd, ``StateDirectory=``/``StateDirectoryMode=0700`` see to that; run any other way
the directory may exist already with mode 0755, holding a ``jobs.db`` left 0644 by an
earlier run (and SQLite gives a new ``-wal`` file the mode of its database, whatever the
umask). So :func:`prepare_state_dir` does not trust an existing directory: it makes it
0700 or refuses to start.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path

from agent.errors import StateDirError
from agent.health.facts import Problem

MODE = 0o700


def prepare_state_dir(path: Path) -> Problem | None:
    """Create the state directory, or make an existing one private; then probe it.

    A directory that cannot be created for another reason than a read-only or
    forbidden parent (a parent that is a file, an I/O error) is a health problem,
    returned: the agent serves ``/healthz`` and takes no jobs. An existing directory is
    made mode 0700, and the regular files directly in it that the agent's user owns
    (``jobs.db*``, the ledger) lose every group and other bit. Raises
    :class:`StateDirError` when the directory is not owned by the agent's user (its
    owner could open it up again at any time), cannot be chmod'ed, or is read-only to
    the agent (:func:`read_only_hint`). Idempotent.
    """
    try:
        path.mkdir(mode=MODE, parents=True, exist_ok=True)
    except OSError as exc:
        if exc.errno in _READ_ONLY:
            raise StateDirError(read_only_hint(path, exc)) from exc
        return Problem(
            "state_dir_unwritable",
            f"state directory {path} cannot be created: {exc.strerror}",
            restart_helps=True,
        )
    make_private(path)
    problem, error = _probe(path)
    # Read-only at start is a setting, not a passing fault: under systemd it is a
    # state_dir outside /var/lib with no ReadWritePaths=, and as a health problem it
    # would starve the watchdog into a restart every WatchdogSec, forever. Exit 78
    # (RestartPreventExitStatus=) with the fix instead. Later, check_state_dir keeps
    # reporting a read-only remount as a problem a restart may cure.
    if error is not None and error.errno in _READ_ONLY:
        raise StateDirError(read_only_hint(path, error)) from error
    return problem


# EROFS: a read-only mount (systemd's ProtectSystem=strict). EACCES and EPERM: an
# agent not running as root, or an immutable directory (chattr +i), which even root
# cannot write in.
_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)


def read_only_hint(path: Path, exc: OSError) -> str:
    """The message for a state directory the agent cannot write, with the fix."""
    return (
        f"state directory {path} is read-only to the agent; under systemd add "
        f"ReadWritePaths={path} to the unit (systemctl edit cloudbender-agent), or use "
        f"the default /var/lib/cloudbender-agent (writing there: {exc.strerror})"
    )


def make_private(path: Path) -> None:
    """Make the existing directory ``path`` mode 0700 and its own files owner-only.

    Raises :class:`StateDirError` naming ``path`` when that cannot be done.
    """
    try:
        st = os.stat(path)
    except OSError as exc:
        raise StateDirError(f"state directory {path} cannot be read: {exc.strerror}") from exc
    euid = os.geteuid()
    if st.st_uid != euid:
        raise StateDirError(
            f"state directory {path} is owned by uid {st.st_uid}, not by the agent's user "
            f"(uid {euid}): that user could read the job store and the audit ledger. "
            f"Give it to uid {euid} (chown) or set state_dir to a directory of its own"
        )
    if stat.S_IMODE(st.st_mode) != MODE:
        try:
            os.chmod(path, MODE)
        except OSError as exc:
            if exc.errno in _READ_ONLY:
                raise StateDirError(read_only_hint(path, exc)) from exc
            raise StateDirError(
                f"state directory {path} has mode {stat.S_IMODE(st.st_mode):04o} and cannot "
                f"be made {MODE:04o}: {exc.strerror}"
            ) from exc
    _tighten_files(path, euid)


def _tighten_files(path: Path, euid: int) -> None:
    # Files left by an earlier run under a looser umask: SQLite gives a new -wal or
    # -shm file the mode of jobs.db, whatever the umask. Best effort: once the
    # directory is 0700 nobody else can reach them anyway, and a read-only file system
    # (which the writability probe reports) must not be a reason to refuse the start.
    # Only regular files directly here: job output directories belong to the job's
    # user, and the modules that own subdirectories create them 0700.
    with contextlib.suppress(OSError), os.scandir(path) as entries:
        for entry in entries:
            with contextlib.suppress(OSError):
                st = entry.stat(follow_symlinks=False)
                loose = stat.S_IMODE(st.st_mode) & 0o077
                # One link only: a hard link planted while the directory was open
                # would have this chmod change a file elsewhere. Not a symbolic link
                # (lstat), and the directory is now 0700 and ours: nobody can swap
                # one in before the chmod.
                if stat.S_ISREG(st.st_mode) and st.st_uid == euid and st.st_nlink == 1 and loose:
                    os.chmod(entry.path, stat.S_IMODE(st.st_mode) & ~0o077)


def check_state_dir(path: Path) -> Problem | None:
    """Write, fsync and remove a probe file; return a problem or None.

    A full disk is reported but does not starve the watchdog: restarting would not free
    space, and the agent must keep serving (docs/design.md §5). Any other write failure
    (read-only remount, I/O error) is one a restart may cure.
    """
    return _probe(path)[0]


def _probe(path: Path) -> tuple[Problem | None, OSError | None]:
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
            full = f"state directory {path} is full: {exc.strerror}"
            return Problem("state_dir_full", full), exc
        return Problem(
            "state_dir_unwritable",
            f"state directory {path} is not writable: {exc.strerror}",
            restart_helps=True,
        ), exc
    return None, None
