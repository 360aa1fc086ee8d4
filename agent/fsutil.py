"""Removing directory trees that someone else filled: iterative, link-safe, no path limits.

The trees the agent deletes (an unpacked model archive, a job's output, a spool
entry) were shaped by a peer, so their depth and names are the peer's choice.
``shutil.rmtree`` and ``os.walk`` recurse in Python 3.11 (a tree some 1,000 levels
deep raises :class:`RecursionError`, which ``ignore_errors=True`` does not catch), and
anything that joins names into one path fails with ``ENAMETOOLONG`` once the tree is
deeper than ``PATH_MAX`` allows. :func:`remove_tree` has neither limit:

- it holds one directory descriptor at a time and works name by name relative to it
  (``dir_fd``), so neither the depth nor the total path length matters, and memory
  grows only with the names still to be visited;
- it never follows a symbolic link: a link is unlinked, never entered, wherever it is,
  ``path`` itself included; directories are opened with ``O_NOFOLLOW``;
- it climbs back with ``..`` and checks, by device and inode, that it arrived where it
  came from: a directory moved away mid-removal stops it with an error instead of
  letting it delete outside the tree.

:func:`discard_tree` is the lenient form for cleanups that must never stop the agent.

Beside them: :func:`fsync_dir`, :func:`write_atomic` and :func:`start_writeback`.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import functools
import os
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger(__name__)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# A name listed as a directory that is no longer one when opened (ELOOP: it became a
# link meanwhile) is unlinked like any other non-directory.
_NOT_A_DIR = (errno.ENOTDIR, errno.ELOOP)


@dataclass
class _Level:
    """A directory being emptied: its name in its parent, its identity, what is left."""

    name: str
    dev: int
    ino: int
    subdirs: list[str] = field(default_factory=list)


def remove_tree(path: Path | str) -> None:
    """Remove ``path`` and everything under it, never following a link.

    A missing ``path`` (or entries that vanish meanwhile) is not an error; a link or a
    file at ``path`` is unlinked. Raises :class:`OSError` for anything else (what is
    not yet removed stays: entries added meanwhile, a directory moved away during the
    removal, no permission), and :class:`ValueError` for a ``path`` that ends in
    ``.``, ``..`` or is ``/``. Idempotent. Blocking: run it in a worker thread when on
    the event loop.
    """
    text = os.fspath(path).rstrip("/")
    name = os.path.basename(text)
    if name in ("", ".", ".."):
        raise ValueError(f"refusing to remove {os.fspath(path)!r}")
    try:
        parent = os.open(os.path.dirname(text) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        _remove_in(parent, name)
    finally:
        os.close(parent)


def discard_tree(path: Path | str, *, event: str = "tree_remove_failed") -> bool:
    """:func:`remove_tree`, but a failure is logged as ``event`` (a warning), not raised.

    For cleanups whose failure must not stop the agent: a leftover costs disk space,
    a crash at startup costs the node. True when ``path`` is gone.
    """
    try:
        remove_tree(path)
    except OSError as exc:
        log.warning(event, path=os.fspath(path), error=exc.strerror, errno=exc.errno)
        return False
    return True


def _remove_in(parent: int, name: str) -> None:
    try:
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        _unlink(parent, name)
        return
    fd = _open_dir(parent, name)
    if fd is None:
        return
    try:
        # Depth-first, one descriptor held: ``stack`` has one level per directory
        # between ``name`` and ``fd``, each with the subdirectories it has left.
        stack = [_enter(fd, name)]
        while stack:
            top = stack[-1]
            if top.subdirs:
                sub = top.subdirs.pop()
                child = _open_dir(fd, sub)
                if child is not None:
                    fd, old = child, fd
                    os.close(old)
                    stack.append(_enter(fd, sub))
                continue
            stack.pop()
            if stack:
                up = _climb(fd, stack[-1])
                fd, old = up, fd
                os.close(old)
                _rmdir(fd, top.name)
    finally:
        os.close(fd)
    _rmdir(parent, name)


def _enter(fd: int, name: str) -> _Level:
    """Identify the directory ``fd``, unlink its non-directories, list its subdirectories."""
    st = os.fstat(fd)
    with os.scandir(fd) as entries:
        listed = [(entry.name, entry.is_dir(follow_symlinks=False)) for entry in entries]
    level = _Level(name, st.st_dev, st.st_ino)
    for entry_name, is_dir in listed:
        if is_dir:
            level.subdirs.append(entry_name)
        else:
            _unlink(fd, entry_name)
    return level


def _open_dir(parent: int, name: str) -> int | None:
    """``name`` opened as a directory; None when it is gone, or was not one (unlinked)."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno not in _NOT_A_DIR:
            raise
    _unlink(parent, name)
    return None


def _climb(fd: int, expected: _Level) -> int:
    """A new descriptor for ``..`` of ``fd``, which must be ``expected``; else OSError."""
    up = os.open("..", _DIR_FLAGS, dir_fd=fd)
    st = os.fstat(up)
    if (st.st_dev, st.st_ino) != (expected.dev, expected.ino):
        os.close(up)
        # Moved away while we were inside: its ".." is not the directory we emptied,
        # and deleting on from there would delete outside the tree.
        raise OSError(errno.ESTALE, "a directory was moved during the removal", expected.name)
    return up


def _unlink(parent: int, name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=parent)


def _rmdir(parent: int, name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(name, dir_fd=parent)


def fsync_dir(directory: Path | str) -> None:
    """Make the entries of ``directory`` (a file created, renamed or removed in it)
    survive a crash. Raises ``OSError``."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Write ``data`` to ``path`` whole or not at all, mode 0600.

    A temporary file with a fresh name (``mkstemp``: ``O_EXCL``, 0600; a name derived from
    ``path`` could exceed 255 bytes) is written, then renamed over ``path``. ``durable``:
    the file is fsynced before the rename and the directory after it, so that after a
    crash ``path`` holds the old or the new bytes, never none or a part. Raises
    ``OSError`` (the temporary file is removed).
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(path.parent)


# <fcntl.h>: start writing the range back, do not wait for it.
_SYNC_FILE_RANGE_WRITE = 2


@functools.cache
def _sync_file_range() -> Any:
    try:
        call = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).sync_file_range
    except (OSError, AttributeError, TypeError):
        return None  # not glibc on Linux: writeback starts when the kernel decides
    call.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    call.restype = ctypes.c_int
    return call


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Have the kernel start writing ``length`` bytes of ``fd`` from ``offset`` to the
    disk now, without waiting and without dropping them from the page cache (Linux's
    ``sync_file_range`` with ``SYNC_FILE_RANGE_WRITE``).

    Not durability: that still takes ``fdatasync``. It spreads the writeback of a large
    file over its writing, instead of letting a GiB of dirty pages pile up until the
    kernel's dirty limit throttles the writer and the final ``fdatasync`` writes the
    rest. A no-op where the call is missing; an error is ignored (the final sync
    reports a real one)."""
    call = _sync_file_range()
    if call is not None:
        call(fd, offset, length, _SYNC_FILE_RANGE_WRITE)
