"""Result files on the CP's disk (docs/protocol.md §5): partial files, fsync, the final tree.

Layout under the results directory ``root`` (``<node>`` and ``<job>`` are
:func:`~agent.controlplane.manifest.fs_name` of the ids)::

    <root>/<node>/<job>/<path>                   accepted results, named as in the manifest
    <root>/+partial/<node>/<job>/manifest.json   the manifest being received
    <root>/+partial/<node>/<job>/<index>         file <index>, as received so far
    <root>/+accepted/<node>/<job>.json           the manifest of accepted results

Bytes reach a result's path only after every file's size and sha256 were checked, by
a rename. The partial tree and the marker let a control plane built on the same
``root`` resume an upload, or answer ``result.accepted`` again, after a restart.
Directories are ``0700`` and files ``0600``: results are the consumer's data.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, BinaryIO

from agent.controlplane.manifest import Manifest, fs_name

PARTIAL = "+partial"
ACCEPTED = "+accepted"
_READ = 1024 * 1024


class JobFiles:
    """The files of one ``(node_id, job_id)``. Blocking I/O; one user at a time.

    Keeps the partial files it writes open until :meth:`close`, :meth:`discard` or
    :meth:`finish`. Raises ``OSError`` when the disk does.
    """

    def __init__(self, root: Path, node_id: str, job_id: str) -> None:
        node, job = fs_name(node_id), fs_name(job_id)
        self.final_dir = root / node / job
        self.partial_dir = root / PARTIAL / node / job
        self.marker = root / ACCEPTED / node / f"{job}.json"
        self._open: dict[int, BinaryIO] = {}

    def _partial(self, index: int) -> Path:
        return self.partial_dir / str(index)

    def begin(self, manifest: Manifest) -> None:
        """Start receiving ``manifest`` afresh: every partial byte is forgotten."""
        self.close()
        shutil.rmtree(self.partial_dir, ignore_errors=True)
        self.partial_dir.mkdir(mode=0o700, parents=True)
        _write_json(self.partial_dir / "manifest.json", manifest.entries())

    def write(self, index: int, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset`` of file ``index`` (not yet durable: see :meth:`sync`)."""
        handle = self._open.get(index)
        if handle is None:
            path = self._partial(index)
            handle = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o600), "r+b")
            self._open[index] = handle
        handle.seek(offset)
        handle.write(data)

    def complete(self, index: int) -> None:
        """File ``index`` has all its bytes: close it (durable at the next :meth:`sync`)."""
        handle = self._open.pop(index, None)
        if handle is not None:
            handle.close()

    def sync(self) -> None:
        """Make every byte written so far durable, files and directory entries alike.

        One ``sync(2)`` for the batch rather than an fsync per file: 10,000 small
        results would otherwise cost 10,000 journal commits (and as many open files).
        """
        for handle in self._open.values():
            handle.flush()
        os.sync()

    def discard(self, index: int) -> None:
        """Forget every byte of file ``index`` (it will be sent again from 0)."""
        handle = self._open.pop(index, None)
        if handle is not None:
            handle.close()
        self._partial(index).unlink(missing_ok=True)

    def finish(self, manifest: Manifest) -> dict[str, Path]:
        """Move the checked files to their paths; ``path -> file``. Replaces older results."""
        self.close()
        shutil.rmtree(self.final_dir, ignore_errors=True)
        self.final_dir.mkdir(mode=0o700, parents=True)  # an empty result is an empty directory
        placed: dict[str, Path] = {}
        for entry in manifest.files:
            # manifest.parse() allowed only relative paths without "." or ".." parts.
            target = self.final_dir / entry.path
            target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            source = self._partial(entry.index)
            if source.exists():
                os.replace(source, target)
            else:  # an empty file: no chunk ever created it
                os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
            placed[entry.path] = target
        self.marker.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        _write_json(self.marker, manifest.entries())
        shutil.rmtree(self.partial_dir, ignore_errors=True)
        return placed

    def close(self) -> None:
        """Sync and close the open partial files (their bytes stay on disk)."""
        for handle in self._open.values():
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
        self._open.clear()

    # -- after a restart of the control plane ------------------------------------------

    def accepted_files(self, manifest: Manifest) -> dict[str, Path] | None:
        """The files of ``manifest`` if these very results were accepted earlier."""
        if _read_json(self.marker) != manifest.entries():
            return None
        placed = {entry.path: self.final_dir / entry.path for entry in manifest.files}
        return placed if all(p.is_file() for p in placed.values()) else None

    def held(self, manifest: Manifest) -> list[int] | None:
        """Bytes held of each file of ``manifest`` from an earlier upload of it, or ``None``.

        Each partial file is synced first; one longer than its entry is cut to size.
        """
        if _read_json(self.partial_dir / "manifest.json") != manifest.entries():
            return None
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
    temporary = path.with_name(path.name + ".tmp")
    with os.fdopen(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as out:
        json.dump(value, out)
        out.flush()
        os.fsync(out.fileno())
    os.replace(temporary, path)
    _sync_dir(path.parent)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
