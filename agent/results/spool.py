"""The result spool: verified copies of a job's result files, kept until delivered.

Layout under ``<state_dir>/spool/<job_id>/``: ``data`` (the bytes that were hashed,
every file packed in index order: file ``i`` starts at :attr:`Manifest.offsets` ``[i]``)
and ``manifest.json`` (written last, atomically: a spool entry without it is an
interrupted copy and is redone). An entry spooled by an earlier agent (0.1) keeps one
file per result, ``files/<index>`` (:meth:`Spool.legacy_file_path`); it is read as
it is. Everything is root-only (0700 / 0600). Spooled
results survive agent restarts; delivered ones are deleted after
``results.retention_h``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.faults import crash_point
from agent.fsutil import discard_tree, remove_tree
from agent.paths import child
from agent.protocol import messages
from agent.results.scan import ResultFile, check_output, copy_into_spool


@dataclass(frozen=True)
class Manifest:
    job_id: str
    files: tuple[ResultFile, ...]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def offsets(self) -> list[int]:
        """Where each file starts in the spool's ``data`` file."""
        starts, at = [], 0
        for f in self.files:
            starts.append(at)
            at += f.size
        return starts

    def to_message(self) -> dict[str, Any]:
        """The ``result.manifest`` message of §5."""
        return messages.result_manifest(
            self.job_id, [f.to_dict() for f in self.files], self.total_bytes
        )


class Spool:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _dir(self, job_id: str) -> Path:
        # Raises UnsafeName for an id that is not one plain path component.
        return child(self.root, job_id)

    def data_path(self, job_id: str) -> Path:
        """The file holding every spooled byte of the job (see the module doc)."""
        return self._dir(job_id) / "data"

    def legacy_file_path(self, job_id: str, index: int) -> Path:
        """File ``index`` of an entry spooled one file per result (an older agent)."""
        return self._dir(job_id) / "files" / str(index)

    def store(self, job_id: str, output_dir: Path, max_bytes: int, max_files: int) -> Manifest:
        """Check the output, copy it in, write the manifest. Blocking: run in a thread.

        Raises ``ResultInvalid`` / ``ResultTooLarge`` (nothing is kept then) or
        ``OSError`` (disk full: the caller decides).
        """
        self.remove(job_id)
        try:
            checked = check_output(output_dir, max_bytes, max_files)
            files = copy_into_spool(output_dir, checked, self.data_path(job_id))
            crash_point("spool.files_copied")
            manifest = Manifest(job_id, tuple(files))
            self._write_manifest(manifest)
        except BaseException:
            discard_tree(self._dir(job_id), event="spool_cleanup_failed")
            raise
        return manifest

    def _write_manifest(self, manifest: Manifest) -> None:
        path = self._dir(manifest.job_id) / "manifest.json"
        tmp = path.with_suffix(".tmp")
        data = json.dumps(
            {"job_id": manifest.job_id, "files": [f.to_dict() for f in manifest.files]}
        )
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def load(self, job_id: str) -> Manifest | None:
        """The spooled manifest, or None when there is no complete spool entry."""
        try:
            data = json.loads((self._dir(job_id) / "manifest.json").read_text())
        except (OSError, ValueError):
            return None
        files = tuple(
            ResultFile(f["index"], f["path"], f["size"], f["sha256"]) for f in data["files"]
        )
        return Manifest(job_id, files)

    def mark_delivered(self, job_id: str) -> None:
        (self._dir(job_id) / "delivered").touch(mode=0o600)

    def purge_delivered(self, retention_s: float, now: float | None = None) -> list[str]:
        """Delete delivered entries older than ``retention_s``; return their job ids.
        An entry that cannot be deleted is logged and left for the next pass."""
        now = time.time() if now is None else now
        gone = []
        for entry in sorted(self.root.iterdir()):
            marker = entry / "delivered"
            try:
                if now - marker.stat().st_mtime <= retention_s:
                    continue
            except OSError:
                continue  # not delivered (or not an entry)
            if discard_tree(entry, event="spool_purge_failed"):
                gone.append(entry.name)
        return gone

    def remove(self, job_id: str) -> None:
        """Delete the job's spool entry. Idempotent; raises ``OSError`` when the disk
        refuses (a half-deleted entry has no manifest and is redone)."""
        remove_tree(self._dir(job_id))
