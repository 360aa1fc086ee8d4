"""The output gate: a job's output directory → spooled copies and a verified manifest.

Only regular files leave the site. The walk never follows a link: directories are
opened relative to their parent's descriptor with ``O_NOFOLLOW | O_DIRECTORY``, files
with ``O_NOFOLLOW | O_NONBLOCK`` and checked with ``fstat`` on the descriptor that is
then read, so a name swapped for a link or a FIFO between the check and the read is
still refused. A symbolic link, device, FIFO or socket anywhere ends the job
``result_invalid``; totals over the limits end it ``result_too_large``; in either case
nothing is copied or sent.

Names: every name must be UTF-8, printable (``str.isprintable``: no C0 or C1 control,
no DEL, no format character such as a bidi override or a zero-width joiner, no line
separator, no space but U+0020, nothing unassigned) and without a backslash; else
``result_invalid``. A name is shown to people (``cloudbender-agent audit``, logs, the
control plane's views): ``ESC [1A ESC [2K`` in one would erase the line above it and
print a forged one. A backslash is refused because the ledger and a Windows peer
would read it as a separator. The refusal names the file with those characters
escaped (:func:`agent.escaping.escape`).

Cost: the job chooses how many names its output holds. Each directory's names are
counted while they are read (files against ``max_files``, directories against as
many again), and the walk stops at the first one over; only a directory that fits
is sorted (the manifest is in path order). Memory is bounded by the budget, not by
the directory.

The whole tree is checked first, then each file is copied into the spool while being
hashed, in one pass: what is sent later is exactly what was hashed, and the job's
directory can no longer change it. The copies are packed, in manifest order, into one
spool file (:func:`copy_into_spool`).
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.errors import AgentError
from agent.escaping import escape
from agent.faults import crash_point
from agent.fsutil import start_writeback

COPY_BLOCK = 1024 * 1024
# The spool's writeback is started every this many bytes (agent.fsutil.start_writeback).
WRITEBACK_EVERY = 8 * 1024 * 1024
MAX_DEPTH = 64
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class ResultError(AgentError):
    """The job's output cannot be sent; ``reason`` is the docs/protocol.md failure reason."""

    reason = "result_invalid"


class ResultInvalid(ResultError):
    """A link, device, FIFO, socket or unusable name (not UTF-8, not printable, with a
    backslash) in the output."""


class ResultTooLarge(ResultError):
    reason = "result_too_large"


@dataclass(frozen=True)
class ResultFile:
    index: int
    path: str  # relative, '/'-separated
    size: int
    sha256: str

    def to_dict(self) -> dict[str, object]:
        return {"index": self.index, "path": self.path, "size": self.size, "sha256": self.sha256}


@dataclass(frozen=True)
class _Found:
    path: str
    size: int
    parts: tuple[str, ...]


@contextmanager
def _opened(name: str, flags: int, dir_fd: int | None) -> Iterator[int]:
    fd = os.open(name, flags, dir_fd=dir_fd)
    try:
        yield fd
    finally:
        os.close(fd)


def _kind(mode: int) -> str:
    for test, word in (
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return word
    return "not a regular file"


def _check_name(name: str, prefix: tuple[str, ...]) -> None:
    # Only surrogates fail to encode as UTF-8, and they are not printable: one test
    # covers both in the common case.
    if name.isprintable() and "\\" not in name:
        return
    where = escape("/".join((*prefix, name)))
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise ResultInvalid(f"{where}: a name that is not UTF-8") from None
    if "\\" in name:
        raise ResultInvalid(f"{where}: a name with a backslash")
    raise ResultInvalid(f"{where}: a name with a control or format character")


@dataclass
class _Budget:
    bytes_left: int
    files_left: int
    dirs_left: int  # a tree of empty directories costs a walk too


def _walk(dir_fd: int, prefix: tuple[str, ...], found: list[_Found], budget: _Budget) -> None:
    if len(prefix) > MAX_DEPTH:
        raise ResultInvalid(f"{'/'.join(prefix)}: directories nested deeper than {MAX_DEPTH}")
    for name in sorted(_names(dir_fd, prefix, budget)):
        parts = (*prefix, name)
        rel = "/".join(parts)  # printable: _names checked it
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            with _opened(name, _DIR_FLAGS, dir_fd) as sub:
                _walk(sub, parts, found, budget)
        elif stat.S_ISREG(st.st_mode):
            found.append(_Found(rel, st.st_size, parts))
            budget.bytes_left -= st.st_size
            if budget.bytes_left < 0:
                raise ResultTooLarge("results larger than allowed")
        else:
            raise ResultInvalid(f"{rel} is {_kind(st.st_mode)}")


def _names(dir_fd: int, prefix: tuple[str, ...], budget: _Budget) -> list[str]:
    """The names in ``dir_fd``, each checked and counted as it is read.

    A directory counts against ``dirs_left``, anything else against ``files_left``
    (what is not a regular file is refused later anyway); the first name over either
    raises :class:`ResultTooLarge`, so a directory of a million entries costs at most
    the budget's worth of names. ``_walk`` stats each name again and trusts only that.
    """
    names: list[str] = []
    with os.scandir(dir_fd) as entries:
        for entry in entries:
            _check_name(entry.name, prefix)
            if entry.is_dir(follow_symlinks=False):
                budget.dirs_left -= 1
                if budget.dirs_left < 0:
                    raise ResultTooLarge("too many directories in the output")
            else:
                budget.files_left -= 1
                if budget.files_left < 0:
                    raise ResultTooLarge("more result files than allowed")
            names.append(entry.name)
    return names


def check_output(output_dir: Path, max_bytes: int, max_files: int) -> list[tuple[str, int]]:
    """Walk the output without following links: ``[(relative path, size)]`` in path order.

    Raises :class:`ResultInvalid` or :class:`ResultTooLarge`. The output directory
    itself must be a real directory (a link in its place is refused too).
    """
    found: list[_Found] = []
    try:
        with _opened(str(output_dir), _DIR_FLAGS, None) as root:
            _walk(root, (), found, _Budget(max_bytes, max_files, max_files))
    except ResultTooLarge as exc:
        raise ResultTooLarge(f"{exc} (at most {max_files} files, {max_bytes} bytes)") from None
    except OSError as exc:
        raise ResultInvalid(f"output cannot be read: {exc.strerror}") from exc
    return [(f.path, f.size) for f in found]


def copy_into_spool(output_dir: Path, files: list[tuple[str, int]], data: Path) -> list[ResultFile]:
    """Copy the checked files, in order, into the one spool file ``data``, hashing each in
    the same pass: what is sent later is exactly what was hashed, and the job can no
    longer change it. File ``i`` starts at the sum of the sizes before it.

    One file for all, written through one buffer: creating a file per result cost a
    directory entry, an inode and a write each (10,000 small results spent most of
    their spooling there), and a file system whose inode groups hold many recently
    deleted inodes makes each creation far slower still.

    ``data`` is durable (``fdatasync``) when this returns. The output is only read, never
    moved: until the caller has made the spool's manifest durable, the output stays
    whole, so a crash at any point here loses nothing (a restart spools it again).
    Raises :class:`ResultInvalid` when a file is no longer the regular file of the size
    that was checked (``data`` is then removed), ``OSError`` when the spool's disk fails.
    """
    data.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    out: list[ResultFile] = []
    fd = os.open(data, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        packer, parents = _Packer(fd), _Parents(output_dir)
        try:
            for index, (rel, size) in enumerate(files):
                parts = rel.split("/")
                digest = _copy_hashing(parents.open(parts, rel), parts[-1], size, rel, packer)
                out.append(ResultFile(index, rel, size, digest))
                crash_point("spool.file_copied")
            packer.flush()
            # One durability point for the whole entry (its directory entry is synced
            # with the manifest's): the bytes hashed survive a power cut, and their
            # writeback is done here rather than under the upload that follows.
            os.fdatasync(fd)
        finally:
            parents.close()
    except BaseException:
        os.close(fd)
        data.unlink(missing_ok=True)
        raise
    os.close(fd)
    return out


class _Parents:
    """The directory holding the current file, kept open while the next files (in path
    order, so mostly in the same directory) need it; no link followed on the way."""

    def __init__(self, output_dir: Path) -> None:
        self._root = output_dir
        self._held: tuple[tuple[str, ...], int] | None = None

    def open(self, parts: list[str], rel: str) -> int:
        where = tuple(parts[:-1])
        if self._held is not None and self._held[0] == where:
            return self._held[1]
        self.close()
        try:
            fd = os.open(str(self._root), _DIR_FLAGS)
            try:
                for part in where:
                    sub = os.open(part, _DIR_FLAGS, dir_fd=fd)
                    os.close(fd)
                    fd = sub
            except BaseException:
                os.close(fd)
                raise
        except OSError as exc:
            raise ResultInvalid(f"{rel} cannot be reached without a link: {exc.strerror}") from exc
        self._held = (where, fd)
        return fd

    def close(self) -> None:
        if self._held is not None:
            os.close(self._held[1])
            self._held = None


class _Packer:
    """Appends to the spool file through one reused buffer: a small file costs no write
    of its own, a large one is read and written in :data:`COPY_BLOCK` pieces."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._view = memoryview(bytearray(COPY_BLOCK))
        self._used = 0
        self._written = 0  # bytes written to the spool file
        self._pushed = 0  # of which writeback was started

    def append(self, src: int, digest: Any) -> int:
        """Read ``src`` to its end into the spool file, feeding ``digest``; bytes read."""
        copied = 0
        while True:
            if self._used == len(self._view):
                self.flush()
            free = self._view[self._used :]
            n = os.readv(src, [free])
            if n == 0:
                return copied
            digest.update(free[:n])
            self._used += n
            copied += n

    def flush(self) -> None:
        data = self._view[: self._used]
        while data:
            data = data[os.write(self._fd, data) :]
        self._written += self._used
        self._used = 0
        # The disk writes the spool while the next pieces are read and hashed, rather
        # than all of it in the final fdatasync: for 1 GiB on the development VM that
        # sync went from 0.35 s to nothing (docs/results.md §6).
        if self._written - self._pushed >= WRITEBACK_EVERY:
            start_writeback(self._fd, self._pushed, self._written - self._pushed)
            self._pushed = self._written


def _copy_hashing(parent: int, name: str, size: int, rel: str, packer: _Packer) -> str:
    try:
        src = os.open(name, _FILE_FLAGS, dir_fd=parent)
    except OSError as exc:
        raise ResultInvalid(f"{rel} cannot be opened as a regular file: {exc.strerror}") from exc
    digest = hashlib.sha256()
    try:
        st = os.fstat(src)
        if not stat.S_ISREG(st.st_mode) or st.st_size != size:
            raise ResultInvalid(f"{rel} changed after it was checked")
        copied = packer.append(src, digest)
    finally:
        os.close(src)
    if copied != size:
        raise ResultInvalid(f"{rel} changed while it was copied")
    return digest.hexdigest()
