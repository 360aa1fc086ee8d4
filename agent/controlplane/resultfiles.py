"""Result files on the CP's disk (docs/protocol.md §5): partial files, durability, publishing.

Layout under the results directory ``root`` (``<node>`` and ``<job>`` are
:func:`~agent.controlplane.manifest.fs_name` of the ids)::

    <root>/<node>/<job>/<path>                       accepted results, named as in the manifest
    <root>/+partial/<node>/<job>/manifest.json       the manifest being received
    <root>/+partial/<node>/<job>/files/<path>        each file, as received so far
    <root>/+accepted/<node>/<job>.json               the manifest of accepted results

Results are published by one rename of the finished ``files`` directory, after every
file's size and sha256 were checked: one step however many files, and a reader never
sees part of a result. Durability (:meth:`JobFiles.durable`) is ``fdatasync`` of each
file written since the last durable point and ``fsync`` of each directory that gained
an entry, never a global ``sync()`` (which would also flush every other process's
writes); written pages are then dropped from the page cache, since the CP does not read
them again and keeping them only makes the next writes find cold memory.

The partial tree and the marker let a control plane built on the same
``root`` resume an upload, or answer ``result.accepted`` again, after a restart.
Directories are ``0700`` and files ``0600``: results are the consumer's data.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

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

    def _partial(self, index: int) -> Path:
        # manifest.parse() allowed only relative paths without "." or ".." parts.
        return self.tree / self._paths[index]

    def use(self, manifest: Manifest) -> None:
        """The manifest whose files are held (after a restart: see :meth:`held`)."""
        self._paths = [entry.path for entry in manifest.files]

    def begin(self, manifest: Manifest) -> None:
        """Start receiving ``manifest`` afresh: every partial byte is forgotten."""
        self.close()
        shutil.rmtree(self.partial_dir, ignore_errors=True)
        self._dirs.clear()
        self._made.clear()
        self.tree.mkdir(mode=0o700, parents=True)
        _write_json(self.partial_dir / "manifest.json", manifest.entries())
        fsync_dir(self.partial_dir.parent)
        self.use(manifest)

    def write(self, index: int, offset: int, data: bytes | memoryview) -> None:
        """Write ``data`` at ``offset`` of file ``index`` (durable at :meth:`durable`)."""
        fd = self._open.get(index)
        if fd is None:
            fd = self._open[index] = self._create(index, os.O_RDWR)
        if len(data) >= DROP_MIN:
            self._drop.add(index)
        view = memoryview(data)
        while view:
            done = os.pwrite(fd, view, offset)
            view, offset = view[done:], offset + done

    def complete(self, index: int) -> None:
        """File ``index`` has all its bytes: closed once durable."""
        if index in self._open:
            self._complete.add(index)
        if len(self._complete) >= MAX_OPEN:
            self.durable()

    def durable(self) -> None:
        """Make every byte written so far durable, and the directory entries made for it."""
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
        ``fdatasync`` covers every write made before it starts, so the returned call
        makes durable everything written before this one."""
        handed: list[tuple[int, bool]] = []
        for index, fd in list(self._open.items()):
            owned = self._open.pop(index) if index in self._complete else os.dup(fd)
            handed.append((owned, index in self._drop))
        self._complete.clear()
        self._drop.intersection_update(self._open)
        deepest_first = sorted(self._new_entries, key=_depth, reverse=True)
        directories = [self.tree / d if d else self.tree for d in deepest_first]
        self._new_entries.clear()
        return partial(_sync_all, handed, directories)

    def discard(self, index: int) -> None:
        """Forget every byte of file ``index`` (it will be sent again from 0)."""
        fd = self._open.pop(index, None)
        self._complete.discard(index)
        self._drop.discard(index)
        if fd is not None:
            os.close(fd)
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
        """Make durable and close the open partial files (their bytes stay on disk)."""
        self.durable()
        for fd in self._open.values():
            os.close(fd)
        self._open.clear()

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

        Each partial file is synced first; one longer than its entry is cut to size.
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
                size = min(os.fstat(handle.fileno()).st_size, entry.size)
                handle.truncate(size)
                os.fsync(handle.fileno())
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


def _sync_all(handed: list[tuple[int, bool]], directories: list[Path]) -> None:
    try:
        for fd, drop in handed:
            os.fdatasync(fd)
            if drop:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        for directory in directories:
            fsync_dir(directory)
    finally:
        for fd, _ in handed:
            os.close(fd)


def _depth(relative: str) -> int:
    return relative.count("/") + 1 if relative else 0


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
