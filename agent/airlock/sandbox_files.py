"""The review command's view of a job's results: read-only copies, removed afterwards.

The spool (agent/results/spool.py) is root-only and packs every file into one
``data`` file (an entry from agent 0.1 keeps ``files/<index>``), so the job user can
read none of it. :func:`stage` rebuilds the manifest's tree in a fresh directory
``<spool entry>/review.XXXX``:

- every directory ``0750 root:<gid>`` and every file ``0640 root:<gid>``: the program
  (uid not root, gid = the job user's group) reads, and can neither write a file, nor
  create, rename or delete a name, nor change a mode;
- every path component of the manifest goes through :func:`agent.paths.child`, and
  each directory and file is created by the agent with ``O_EXCL`` / ``O_NOFOLLOW``
  relative to its parent's descriptor: there is no link anywhere in the tree to follow
  out of it, and nobody but root can add one;
- each copy is checked against the manifest's size and sha256: the program judges
  exactly the bytes that would be sent.

The copy costs the results' size in disk (at most ``results.max_bytes``) for the
length of one review; it lives inside the spool entry, so a crash mid-review leaves
nothing that the spool's own removal does not take.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

from agent.errors import AgentError
from agent.fsutil import remove_tree
from agent.paths import check_component

CHUNK = 1 << 20


class ReviewSandboxError(AgentError):
    """The review command's sandbox could not be set up (nothing of it is left)."""


def stage(files: Path, manifest: dict[str, Any], gid: int) -> Path:
    """Copy the spooled files of ``manifest`` into a new directory under ``files`` and
    return it; the caller must :func:`unstage` it. Blocking: run in a thread.

    Raises :class:`ReviewSandboxError` (a spool that does not hold the manifest's
    bytes, a disk error) or ``agent.paths.UnsafeName`` (a path that is not a plain
    relative one); nothing is left behind then.
    """
    root = Path(tempfile.mkdtemp(prefix="review.", dir=files))
    try:
        os.chown(root, 0, gid)
        os.chmod(root, 0o750)  # noqa: S103 - the group is the job user's alone
        for index, entry in enumerate(manifest["files"]):
            _stage_one(files, manifest["files"], index, entry, root, gid)
    except OSError as exc:
        unstage(root)
        raise ReviewSandboxError(f"cannot stage the results for review: {exc}") from exc
    except BaseException:
        unstage(root)
        raise
    return root


def unstage(root: Path) -> None:
    """Remove a directory made by :func:`stage`. Idempotent."""
    remove_tree(root)


def _source(files: Path, all_files: list[dict[str, Any]], index: int) -> tuple[Path, int]:
    """Where file ``index`` starts: in the packed ``data`` file, or its own legacy file."""
    data = files / "data"
    if data.exists():
        return data, sum(int(f["size"]) for f in all_files[:index])
    return files / "files" / str(int(all_files[index]["index"])), 0


def _stage_one(
    files: Path,
    all_files: list[dict[str, Any]],
    index: int,
    entry: dict[str, Any],
    root: Path,
    gid: int,
) -> None:
    parts = [check_component(p) for p in str(entry["path"]).split("/")]
    dir_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        for part in parts[:-1]:
            try:
                os.mkdir(part, 0o700, dir_fd=dir_fd)
                os.chown(part, 0, gid, dir_fd=dir_fd, follow_symlinks=False)
                os.chmod(part, 0o750, dir_fd=dir_fd)  # noqa: S103 - as above
            except FileExistsError:
                pass  # made for an earlier file: ours, and a directory (O_DIRECTORY checks)
            next_fd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
            os.close(dir_fd)
            dir_fd = next_fd
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        out = os.open(parts[-1], flags, 0o600, dir_fd=dir_fd)
        try:
            _copy(*_source(files, all_files, index), int(entry["size"]), out, entry)
            os.fchown(out, 0, gid)
            os.fchmod(out, 0o640)
        finally:
            os.close(out)
    finally:
        os.close(dir_fd)


def _copy(source: Path, offset: int, size: int, out: int, entry: dict[str, Any]) -> None:
    digest = hashlib.sha256()
    fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        left = size
        while left:
            chunk = os.pread(fd, min(CHUNK, left), offset + size - left)
            if not chunk:
                break
            digest.update(chunk)
            view = memoryview(chunk)
            while view:
                view = view[os.write(out, view) :]
            left -= len(chunk)
    finally:
        os.close(fd)
    if left or digest.hexdigest() != entry["sha256"]:
        raise ReviewSandboxError(
            f"spooled file {entry['index']} differs from the manifest (size or sha256)"
        )
