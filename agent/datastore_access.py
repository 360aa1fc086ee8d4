"""Can the job user read a datastore? The one check behind ``doctor`` and ``check-config``.

A job sees a datastore as a read-only bind mount at ``/opt/data``, running as
``runtime.job_user`` (a numeric ``uid:gid``, never root). A file the job user cannot
read is not an error to the job: a model that globs its inputs skips it, and the job
"succeeds" on part of the data. This module finds such files before a job does.

How: the agent runs as root, so :func:`check_readable` opens the datastore directory
as root, then forks a child that drops to the job user for real (``setgroups([gid])``,
``setgid``, ``setuid``: no capabilities survive) and walks the tree from that
descriptor. Chosen over computing access from ``st_mode``/``st_uid``/``st_gid``
because the kernel's own answer also covers POSIX ACLs, and because a model of the
rules is one more thing to get wrong. Only the primary ``gid``: the container gets
supplementary groups from the *image's* ``/etc/group``, which the agent cannot know,
and for a numeric uid that the image does not name it gets none. The directory is
opened before the drop because the container never walks the host's parents (dockerd
mounts the directory as root); the child then ``fchdir``s into it, which checks the
search bit on the directory itself, and opens ``.``, which checks the read bit.

The walk is bounded (:data:`MAX_ENTRIES`), follows no symlink (in the container an
absolute link resolves inside the container, not on the host), opens no file (it asks
``access(2)``, which after the drop is the job user's answer: no atime touched, no
device or FIFO opened) and opens each directory it descends into. Run as another user
than root, nothing is checked (:attr:`Readability.checked` is ``False``): that user
cannot become the job user.
"""

from __future__ import annotations

import itertools
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_ENTRIES = 10_000  # per datastore: a check that takes seconds, not an hour on a big store
MAX_LISTED = 10  # unreadable paths named; the count covers the rest


@dataclass(frozen=True)
class Readability:
    """What the job user can read in one datastore.

    ``checked`` is ``False`` when nothing could be checked (``why`` says why);
    ``unreadable`` holds up to :data:`MAX_LISTED` paths relative to the datastore
    (``.`` for the directory itself; directories end in ``/``), ``unreadable_count``
    all of them among the ``entries`` seen; ``truncated`` is ``True`` when the walk
    stopped at :data:`MAX_ENTRIES`.
    """

    checked: bool
    entries: int = 0
    unreadable: tuple[str, ...] = ()
    unreadable_count: int = 0
    truncated: bool = False
    why: str | None = None

    @property
    def ok(self) -> bool:
        return self.checked and self.unreadable_count == 0


def parse_job_user(job_user: str) -> tuple[int, int]:
    """``"65534:65534"`` → ``(65534, 65534)``; the config has already checked the form."""
    uid, _, gid = job_user.partition(":")
    return int(uid), int(gid)


def fix_command(path: Path, uid: int) -> str:
    """The command that lets the job user read ``path`` and what is added to it later."""
    return (
        f"setfacl -R -m u:{uid}:rX {path} && setfacl -R -d -m u:{uid}:rX {path}"
        f"  (or, for every user: chmod -R o+rX {path})"
    )


def check_readable(path: Path, job_user: str) -> Readability:
    """Walk ``path`` as the job user; see the module docstring. Never raises for what
    it finds; ``OSError`` from ``fork``/``pipe`` (out of processes) propagates.

    Call it before the process starts threads (it forks).
    """
    uid, gid = parse_job_user(job_user)
    if os.geteuid() != 0:
        return Readability(False, why=f"not checked: only root can act as uid {uid}")
    try:
        top = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        return Readability(False, why=f"cannot open {path}: {exc.strerror}")
    try:
        return _in_child(top, uid, gid)
    finally:
        os.close(top)


def _in_child(top: int, uid: int, gid: int) -> Readability:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        os.close(read_end)
        code = 0
        try:
            os.setgroups([gid])
            os.setgid(gid)
            os.setuid(uid)
            report: dict[str, Any] = _walk(top)
        except BaseException as exc:  # everything must reach the parent
            report, code = {"error": f"{type(exc).__name__}: {exc}"}, 1
        try:
            os.write(write_end, json.dumps(report).encode())
        finally:
            os._exit(code)
    os.close(write_end)
    chunks = []
    with os.fdopen(read_end, "rb") as pipe:
        while chunk := pipe.read(65536):
            chunks.append(chunk)
    os.waitpid(pid, 0)
    report = json.loads(b"".join(chunks) or b'{"error": "the checking process said nothing"}')
    if "error" in report:
        return Readability(False, why=f"not checked: {report['error']}")
    return Readability(
        True,
        entries=int(report["entries"]),
        unreadable=tuple(report["unreadable"]),
        unreadable_count=int(report["unreadable_count"]),
        truncated=bool(report["truncated"]),
    )


class _Walk:
    def __init__(self) -> None:
        self.entries = 0
        self.unreadable: list[str] = []
        self.count = 0

    def bad(self, rel: str) -> None:
        self.count += 1
        if len(self.unreadable) < MAX_LISTED:
            self.unreadable.append(rel)


def _walk(top: int) -> dict[str, Any]:
    walk = _Walk()
    try:
        os.fchdir(top)  # the search bit, as the job user
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # the read bit
    except PermissionError:
        walk.bad("./")
        return _report(walk, truncated=False)
    truncated = not _walk_dir(fd, "", walk)
    return _report(walk, truncated=truncated)


def _walk_dir(fd: int, prefix: str, walk: _Walk) -> bool:
    """Walk one open directory (closing it); ``False`` once :data:`MAX_ENTRIES` is hit."""
    try:
        with os.scandir(fd) as it:
            # The modes while the directory is open: stat() goes through its descriptor.
            # No more than the budget left is read: one directory may hold millions.
            budget = itertools.islice(it, MAX_ENTRIES - walk.entries + 1)
            entries = sorted((e.name, e.stat(follow_symlinks=False).st_mode) for e in budget)
    finally:
        os.close(fd)
    for name, mode in entries:
        if walk.entries >= MAX_ENTRIES:
            return False
        walk.entries += 1
        rel = prefix + name
        if stat.S_ISLNK(mode):
            continue
        if not stat.S_ISDIR(mode):
            # Paths are relative to the datastore, the cwd since fchdir.
            if not os.access(rel, os.R_OK, follow_symlinks=False):
                walk.bad(rel)
            continue
        try:
            child = os.open(rel, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except PermissionError:
            walk.bad(rel + "/")
            continue
        if not os.access(rel, os.X_OK, follow_symlinks=False):
            os.close(child)
            walk.bad(rel + "/")  # listable but its files cannot be opened
            continue
        if not _walk_dir(child, rel + "/", walk):
            return False
    return True


def _report(walk: _Walk, *, truncated: bool) -> dict[str, Any]:
    return {
        "entries": walk.entries,
        "unreadable": walk.unreadable,
        "unreadable_count": walk.count,
        "truncated": truncated,
    }


def describe(name: str, path: Path, found: Readability, job_user: str) -> str:
    """One line for a person: what the job user cannot read in datastore ``name``.
    File names are escaped (they are someone's choice, and reach a terminal)."""
    from agent.escaping import escape

    uid, gid = parse_job_user(job_user)
    if not found.checked:
        return f"datastore {name} ({path}): {found.why}"
    seen = f"{found.entries} entries" + (
        f" (stopped after the first {MAX_ENTRIES})" if found.truncated else ""
    )
    if found.ok:
        return f"datastore {name} ({path}): readable by the job user {uid}:{gid}; {seen}"
    if found.unreadable == ("./",):
        return f"datastore {name} ({path}): the job user {uid}:{gid} cannot open the directory"
    listed = ", ".join(escape(p) for p in found.unreadable)
    more = found.unreadable_count - len(found.unreadable)
    listed += f" and {more} more" if more else ""
    return (
        f"datastore {name} ({path}): the job user {uid}:{gid} cannot read "
        f"{found.unreadable_count} of {seen}, which jobs would skip silently: {listed}"
    )
