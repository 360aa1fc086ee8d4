"""Result files on the CP's disk (docs/protocol.md §5): partial files, durability, publishing.

Layout under the results directory ``root`` (``<node>`` and ``<job>`` are
:func:`~agent.controlplane.manifest.fs_name` of the ids)::

    <root>/<node>/<job>/<path>                       accepted results, named as in the manifest
    <root>/+partial/<node>/<job>/manifest.json       the manifest being received
    <root>/+partial/<node>/<job>/files/<path>        each file, as received so far
    <root>/+accepted/<node>/<job>.json               the manifest of accepted results

Results are published by one rename of the finished ``files`` directory, after every
file's size and sha256 were checked: one step however many files, and a reader never
sees part of a result. Bulk bytes bypass the page cache
(:mod:`agent.controlplane.directwrites`). Durability (:meth:`JobFiles.durable`) is
``fdatasync`` of each file written since the last durable point and ``fsync`` of each
directory that gained an entry, never a global ``sync()`` (which would also flush every
other process's writes). Where the file system refuses direct writes, the pages that
bulk bytes leave in the cache are dropped once durable: the CP does not read them again,
and keeping them only makes the next writes find cold memory.

The partial tree and the marker let a control plane built on the same
``root`` resume an upload, or answer ``result.accepted`` again, after a restart.
Directories are ``0700`` and files ``0600``: results are the consumer's data.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from concurrent.futures import Future
from functools import partial
from pathlib import Path
from typing import Any

from agent.controlplane import directwrites
from agent.controlplane.directwrites import DirectWrites, wait_all
from agent.controlplane.manifest import Manifest, fs_name
from agent.fsutil import fsync_dir, write_atomic

PARTIAL = "+partial"
ACCEPTED = "+accepted"
_READ = 1024 * 1024


# Files kept open between durable points; past it, the completed ones are made durable
# early (harmless: durability may come sooner than the ack that reports it).
MAX_OPEN = 256
# Files written in chunks this large have their pages dropped at each durable point.
DROP_MIN = 64 * 1024


class JobFiles:
    """The files of one ``(node_id, job_id)``. Blocking I/O: one thread at a time.

    :meth:`use` (or :meth:`begin`) must name the manifest's paths before :meth:`write`.
    Keeps the files written since the last :meth:`durable` open until then. Raises
    ``OSError`` when the disk does.
    """

    def __init__(self, root: Path, node_id: str, job_id: str) -> None:
        node, job = fs_name(node_id), fs_name(job_id)
        self.final_dir = root / node / job
        self.partial_dir = root / PARTIAL / node / job
        self.tree = self.partial_dir / "files"
        self.marker = root / ACCEPTED / node / f"{job}.json"
        self._paths: list[str] = []
        self._open: dict[int, int] = {}  # index -> fd, written since the last durable point
        self._complete: set[int] = set()  # of _open: closed at the next durable point
        # Directories of the tree as relative strings ("": the tree itself), not Paths:
        # building and hashing a Path per file cost more than writing a small file.
        self._new_entries: set[str] = set()  # directories to fsync at the next durable point
        self._dirs: set[str] = set()  # directories of the tree known to exist
        self._made: set[int] = set()  # files created since begin(): no stat to find them
        self._drop: set[int] = set()  # of _open: bulk files whose pages are dropped when durable
        self._direct: dict[int, int] = {}  # of _open: index -> its O_DIRECT descriptor
        self._in_flight: list[Future[None]] = []  # direct writes not known to be done
        self._direct_tried = False  # a direct write of these files succeeded
        self._direct_refused = False  # the file system refused O_DIRECT: never again
        self._failed: OSError | None = None  # a failed direct write: durable points raise it

    def _partial(self, index: int) -> Path:
        # manifest.parse() allowed only relative paths without "." or ".." parts.
        return self.tree / self._paths[index]

    def use(self, manifest: Manifest) -> None:
        """The manifest whose files are held (after a restart: see :meth:`held`)."""
        self._paths = [entry.path for entry in manifest.files]

    def begin(self, manifest: Manifest) -> None:
        """Start receiving ``manifest`` afresh: every partial byte is forgotten."""
        self._settle()
        self._failed = None
        self._close_all()
        shutil.rmtree(self.partial_dir, ignore_errors=True)
        self._dirs.clear()
        self._made.clear()
        self.tree.mkdir(mode=0o700, parents=True)
        _write_json(self.partial_dir / "manifest.json", manifest.entries())
        fsync_dir(self.partial_dir.parent)
        self.use(manifest)

    def write(
        self, index: int, offset: int, data: bytes | memoryview, direct: DirectWrites | None = None
    ) -> None:
        """Write ``data`` at ``offset`` of file ``index`` (durable at :meth:`durable`).

        With ``direct``, the whole blocks of a bulk write (at least
        :data:`~agent.controlplane.directwrites.MIN_SIZE`, at a block-aligned offset) are
        handed to it and bypass the page cache; the rest is written here, through it."""
        fd = self._open.get(index)
        if fd is None:
            fd = self._open[index] = self._create(index, os.O_RDWR)
        view = memoryview(data)
        bulk = len(view) >= directwrites.MIN_SIZE and offset % directwrites.ALIGN == 0
        if direct is not None and bulk:
            whole = len(view) - len(view) % directwrites.ALIGN
            if self._write_direct(direct, index, offset, view[:whole]):
                view, offset = view[whole:], offset + whole
        if not view:
            return
        if index in self._direct:
            # Written before this, or the file could end up longer than what it holds:
            # after a kill, held() would take the gap for bytes received.
            self._settle()
            if self._failed is not None:
                raise self._failed
        if len(view) >= DROP_MIN:
            self._drop.add(index)
        while view:
            done = os.pwrite(fd, view, offset)
            view, offset = view[done:], offset + done

    def _write_direct(
        self, direct: DirectWrites, index: int, offset: int, view: memoryview
    ) -> bool:
        """Hand ``view`` (whole blocks) to ``direct``; False (and never again for these
        files) where the file system refuses ``O_DIRECT``. The first direct write is
        waited for, so that a refusal shows here rather than at a durable point."""
        if self._direct_refused:
            return False
        try:
            fd = self._direct.get(index)
            if fd is None:
                path = f"{self.tree}/{self._paths[index]}"
                fd = self._direct[index] = os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
            self._in_flight = [w for w in self._in_flight if not w.done() or w.exception()]
            while view:
                size = min(len(view), directwrites.MAX_WRITE)
                write = direct.submit(fd, offset, view[:size])
                if not self._direct_tried:
                    write.result()
                    self._direct_tried = True
                self._in_flight.append(write)
                view, offset = view[size:], offset + size
        except OSError as exc:
            if exc.errno != errno.EINVAL or self._direct_tried:
                raise
            self._direct_refused = True
            return False
        return True

    def _settle(self) -> None:
        """Wait for the direct writes in flight; a failed one is kept for durable points."""
        in_flight, self._in_flight = self._in_flight, []
        try:
            wait_all(in_flight)
        except OSError as exc:
            self._failed = self._failed or exc

    def complete(self, index: int) -> None:
        """File ``index`` has all its bytes: closed once durable."""
        if index in self._open:
            self._complete.add(index)
        if len(self._complete) >= MAX_OPEN:
            self.durable()

    def durable(self) -> None:
        """Make every byte written so far durable, and the directory entries made for it."""
        self._settle()
        if self._failed is not None:
            raise self._failed
        for fd in self._take_direct():
            os.close(fd)
        for index, fd in list(self._open.items()):
            os.fdatasync(fd)
            if index in self._drop:  # a small file's page or two: not worth the call
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            if index in self._complete:
                os.close(self._open.pop(index))
        self._complete.clear()
        self._drop.intersection_update(self._open)
        deepest_first = sorted(self._new_entries, key=_depth, reverse=True)
        for directory in deepest_first:
            fsync_dir(self.tree / directory if directory else self.tree)
        self._new_entries.clear()

    def start_durable(self) -> Callable[[], None]:
        """What :meth:`durable` would do, split: this takes the files and directories to
        sync (descriptors of completed files handed over, duplicates of the others) and
        returns the syncing, for another thread, so that writing goes on meanwhile.
        ``fdatasync`` covers every write made before it starts, so the returned call,
        which first waits for the direct writes in flight, makes durable everything
        written before this one."""
        if self._failed is not None:
            raise self._failed
        in_flight = list(self._in_flight)  # also kept: a failure is then kept by _settle()
        direct = self._take_direct()
        handed: list[tuple[int, bool]] = []
        for index, fd in list(self._open.items()):
            owned = self._open.pop(index) if index in self._complete else os.dup(fd)
            handed.append((owned, index in self._drop))
        self._complete.clear()
        self._drop.intersection_update(self._open)
        deepest_first = sorted(self._new_entries, key=_depth, reverse=True)
        directories = [self.tree / d if d else self.tree for d in deepest_first]
        self._new_entries.clear()
        return partial(_sync_all, in_flight, direct, handed, directories)

    def _take_direct(self) -> list[int]:
        """The direct descriptors of completed files, for closing once written."""
        return [self._direct.pop(i) for i in self._complete.intersection(self._direct)]

    def discard(self, index: int) -> None:
        """Forget every byte of file ``index`` (it will be sent again from 0)."""
        self._settle()
        for fd in (self._open.pop(index, None), self._direct.pop(index, None)):
            if fd is not None:
                os.close(fd)
        self._complete.discard(index)
        self._drop.discard(index)
        self._made.discard(index)
        self._partial(index).unlink(missing_ok=True)

    def finish(self, manifest: Manifest) -> Path:
        """Publish the checked files by renaming their tree; returns where it is now.
        Replaces older results."""
        self.use(manifest)
        for entry in manifest.files:
            if entry.index in self._made:
                continue
            if not self._partial(entry.index).exists():  # an empty file: no chunk made it
                os.close(self._create(entry.index, os.O_WRONLY))
        self.durable()
        self.close()
        self.tree.mkdir(mode=0o700, parents=True, exist_ok=True)  # an empty result
        shutil.rmtree(self.final_dir, ignore_errors=True)
        self.final_dir.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.rename(self.tree, self.final_dir)
        self._dirs.clear()
        self._made.clear()
        fsync_dir(self.final_dir.parent)
        self.marker.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            # The partial manifest is this manifest (begin() wrote it, held() compared
            # it): moved, not written again, which for 10,000 entries cost 15 ms.
            os.rename(self.partial_dir / "manifest.json", self.marker)
            fsync_dir(self.marker.parent)
        except FileNotFoundError:
            _write_json(self.marker, manifest.entries())
        shutil.rmtree(self.partial_dir, ignore_errors=True)
        return self.final_dir

    def close(self) -> None:
        """Make durable and close the open partial files (their bytes stay on disk).
        A direct write that failed is not raised again: durable points reported it."""
        try:
            self._settle()
            self._failed = None
            self.durable()
        finally:
            self._close_all()

    def _close_all(self) -> None:
        """Close every descriptor, once no direct write is in flight."""
        self._settle()
        for fd in [*self._open.values(), *self._direct.values()]:
            os.close(fd)
        self._open.clear()
        self._direct.clear()
        self._complete.clear()
        self._drop.clear()

    def _create(self, index: int, mode: int) -> int:
        # Per file, no stat: directories seen are remembered, and the file's directory is
        # fsynced at the next durable point whether or not the file was new (harmless).
        rel = self._paths[index]
        parent = rel.rpartition("/")[0]
        if parent not in self._dirs:
            parts = parent.split("/") if parent else []
            for depth in range(1, len(parts) + 1):
                directory = self.tree.joinpath(*parts[:depth])
                if not directory.is_dir():
                    directory.mkdir(mode=0o700)
                    self._new_entries.add("/".join(parts[: depth - 1]))
            self._dirs.add(parent)
        self._new_entries.add(parent)
        self._made.add(index)
        return os.open(f"{self.tree}/{rel}", mode | os.O_CREAT | os.O_CLOEXEC, 0o600)

    # -- after a restart of the control plane ------------------------------------------

    def accepted_files(self, manifest: Manifest) -> Path | None:
        """Where the files of ``manifest`` are, if these very results were accepted earlier."""
        marker = _read_json(self.marker)
        if marker is None or marker != manifest.entries():
            return None
        placed = (self.final_dir / entry.path for entry in manifest.files)
        return self.final_dir if all(p.is_file() for p in placed) else None

    def held(self, manifest: Manifest) -> list[int] | None:
        """Bytes held of each file of ``manifest`` from an earlier upload of it, or ``None``.

        Each partial file is synced first; one longer than its entry is cut to size, and
        one with a hole (bytes never written, where the file system says so) is cut where
        the hole starts. Writes reach the disk in order, so a stop leaves none; a crash of
        the machine might, and the cut keeps ``result.resume`` from claiming them.
        """
        held = _read_json(self.partial_dir / "manifest.json")
        if held is None or held != manifest.entries():
            return None
        # Gone if the CP stopped between publishing the files and moving the marker:
        # then every file is received again, into a new tree.
        self.tree.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.use(manifest)
        offsets = []
        for entry in manifest.files:
            path = self._partial(entry.index)
            if not path.exists():
                offsets.append(0)
                continue
            with path.open("r+b") as handle:
                fd = handle.fileno()
                os.fsync(fd)  # so that every byte written is in an extent SEEK_HOLE sees
                size = min(os.fstat(fd).st_size, entry.size, _first_hole(fd))
                handle.truncate(size)
                os.fsync(fd)
            offsets.append(size)
        return offsets

    def digest_of(self, index: int, length: int) -> Any:
        """A sha256 object fed the first ``length`` bytes of file ``index``."""
        digest = hashlib.sha256()
        if length:
            with self._partial(index).open("rb") as handle:
                while length > 0 and (block := handle.read(min(_READ, length))):
                    digest.update(block)
                    length -= len(block)
        return digest


def _write_json(path: Path, value: Any) -> None:
    # One dumps and one write: json.dump to a file object writes piece by piece.
    write_atomic(path, json.dumps(value).encode())


def _sync_all(
    in_flight: list[Future[None]],
    direct: list[int],
    handed: list[tuple[int, bool]],
    directories: list[Path],
) -> None:
    try:
        try:
            wait_all(in_flight)
        finally:
            for fd in direct:
                os.close(fd)
        for fd, drop in handed:
            os.fdatasync(fd)
            if drop:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        for directory in directories:
            fsync_dir(directory)
    finally:
        for fd, _ in handed:
            os.close(fd)


def _first_hole(fd: int) -> int:
    """Where the first hole (bytes never written) of ``fd`` starts: its size if none."""
    try:
        return os.lseek(fd, 0, os.SEEK_HOLE)
    except OSError:  # a file system without SEEK_HOLE: the whole file counts as written
        return os.fstat(fd).st_size


def _depth(relative: str) -> int:
    return relative.count("/") + 1 if relative else 0


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
