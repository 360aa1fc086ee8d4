"""The model cache's on-disk layout: building, reading and scanning entries. Blocking.

::

    <root>/<sha256>/            0700   one entry; present only once complete
    <root>/<sha256>/entry.json  0600   {"sha256", "bytes"}; its mtime is "last used"
    <root>/<sha256>/model/      0755   the unpacked tree (files 0644)
    <root>/.staging/            0700   entries being built or removed

An entry is built in ``.staging`` and renamed into place as the last step, so a
directory named like an entry is either complete or left by a crash between steps
that cannot produce one (then :func:`scan` reports it incomplete).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from agent.errors import ModelStorageError
from agent.fsutil import discard_tree, fsync_dir
from agent.models.unpack import unpack

ENTRY_FILE = "entry.json"
MODEL_DIR = "model"
STAGING = ".staging"
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass
class Entry:
    """One complete entry: the model's sha256, its unpacked file bytes, when last used."""

    sha256: str
    bytes: int
    last_used: float


def build(root: Path, archive: Path, sha: str, *, max_bytes: int, max_members: int) -> Entry:
    """Unpack ``archive`` into the complete entry ``<root>/<sha>``; remove the archive.

    Raises what :func:`~agent.models.unpack.unpack` raises, and
    :class:`ModelStorageError`. If the entry appeared meanwhile (a build left running by
    a cancelled acquire), that one is returned and this one discarded.
    """
    staging: Path | None = None
    try:
        staging = Path(tempfile.mkdtemp(prefix="build-", dir=root / STAGING))
        size = unpack(archive, staging / MODEL_DIR, max_bytes=max_bytes, max_members=max_members)
        _write_private(staging / ENTRY_FILE, json.dumps({"sha256": sha, "bytes": size}).encode())
        final = root / sha
        try:
            os.rename(staging, final)
        except OSError:
            if not (final / ENTRY_FILE).is_file():
                raise
            return read(final, sha)
        staging = None
        fsync_dir(root)
        return Entry(sha, size, time.time())
    except OSError as exc:
        raise ModelStorageError(f"model cache: {exc.strerror}", exc.errno) from exc
    finally:
        archive.unlink(missing_ok=True)
        if staging is not None:
            # A leftover stays in .staging, emptied at the next start; the error that
            # got us here is the one to report.
            discard_tree(staging, event="model_build_cleanup_failed")


def scan(root: Path) -> Iterator[tuple[Path, Entry | None]]:
    """Every directory under ``root`` named like an entry, with its entry or ``None``
    (incomplete). Other names are not reported."""
    for child in root.iterdir():
        if not _SHA256.fullmatch(child.name):
            continue
        try:
            yield child, read(child, child.name)
        except (OSError, ValueError, KeyError, TypeError):
            yield child, None


def read(path: Path, sha: str) -> Entry:
    """The entry at ``path``. Raises OSError/ValueError/KeyError/TypeError when incomplete."""
    info = path / ENTRY_FILE
    record = json.loads(info.read_bytes())
    size = record["bytes"]
    if record["sha256"] != sha or not isinstance(size, int) or size < 0:
        raise ValueError("entry.json does not describe this entry")
    if not (path / MODEL_DIR).is_dir():
        raise ValueError("no model directory")
    return Entry(sha, size, info.stat().st_mtime)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
