"""Safe unpacking of a model archive: a tar file, optionally gzip-compressed (docs/protocol.md §6).

The archive's sha256 has been checked before it gets here, so its bytes are what the
control plane meant to send; this module makes sure that those bytes cannot hurt the
node. :func:`unpack` refuses, with :class:`~agent.errors.ModelArchiveUnsafe`, any
archive with:

- a member name that is absolute, has a ``..`` component, or is empty;
- a member path over :data:`MAX_PATH_BYTES` bytes (or a component over 255), or more
  than :data:`MAX_DEPTH` directory levels deep;
- a member that is not a regular file or a directory (symbolic and hard links, devices,
  FIFOs, GNU sparse files, …);
- two members for one path (a later member would silently replace an earlier one);
- more than ``max_members`` members, or regular files totalling more than ``max_bytes``;
- tar metadata (pax or GNU long-name headers) over :data:`MAX_META_BYTES`, which
  :mod:`tarfile` would otherwise read whole into memory;
- anything :func:`tarfile.data_filter` refuses, as a second opinion where this
  Python has it (3.11.4 and later; Debian 12's 3.11.2 does not): the rules above are
  this module's own and hold without it;
- bytes that are not a tar archive (or gzip of one) at all.

Nothing is extracted in place: members go into a fresh temporary directory next to
``dest``, which is renamed to ``dest`` only when every member passed. On any refusal
the temporary directory is removed and ``dest`` never appears (should that removal
fail, it is logged and the directory stays where it was made, in the model cache's
``.staging``, which the cache empties at start).

Members are written name by name relative to a directory descriptor (``mkdirat``,
``openat`` with ``O_NOFOLLOW``), so no path handed to the kernel is longer than one
component, and nothing here recurses: neither the depth nor the length of a member's
path can hit ``PATH_MAX`` or Python's recursion limit. The depth and length caps exist
so that whatever removes or walks the tree later need not be this careful.

Modes are normalised: directories ``0755``, files ``0644`` (readable by the job's
non-root user through the read-only bind mount), never setuid/setgid/sticky. Ownership
and timestamps from the archive are ignored: files belong to the agent's user (root in
production).
"""

from __future__ import annotations

import errno
import gzip
import os
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from agent.errors import ModelArchiveUnsafe, ModelStorageError
from agent.fsutil import discard_tree

GZIP_MAGIC = b"\x1f\x8b"
MAX_META_BYTES = 1024 * 1024
MAX_PATH_BYTES = 4096
MAX_COMPONENT_BYTES = 255
MAX_DEPTH = 32  # directory levels: "a/b/c.txt" has 2, the directory "a/b/c/" has 3
DEFAULT_MAX_MEMBERS = 100_000
DIR_MODE = 0o755
FILE_MODE = 0o644
_COPY_BYTES = 1024 * 1024
_META_TYPES = frozenset(
    {tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE}
    | {tarfile.SOLARIS_XHDTYPE}
)
_FILE_TYPES = frozenset({tarfile.REGTYPE, tarfile.AREGTYPE})
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_ERRORS = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile)


class _Refused(Exception):
    """Raised from inside tarfile's header parsing; becomes ModelArchiveUnsafe."""


class _BoundedTarInfo(tarfile.TarInfo):
    # tarfile's documented extension point: _proc_member may be overridden. Refuse
    # metadata headers before tarfile reads them whole into memory, and sparse files
    # before it walks their (unbounded) chain of extension headers.
    def _proc_member(self, tarfile_: tarfile.TarFile) -> Any:
        if self.type in _META_TYPES and self.size > MAX_META_BYTES:
            raise _Refused(f"a tar metadata header of {self.size} bytes")
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise _Refused("a GNU sparse member")
        return super()._proc_member(tarfile_)  # type: ignore[misc]


def _words(name: str) -> str:
    return repr(name if len(name) <= 100 else name[:99] + "…")


def _bytes(text: str) -> int:
    return len(text.encode("utf-8", "surrogateescape"))


def member_parts(member: tarfile.TarInfo) -> list[str]:
    """The path components of a member, ``.`` dropped. Raises ``_Refused``."""
    name = member.name
    if not name or "\x00" in name:
        raise _Refused("a member without a usable name")
    if name.startswith("/"):
        raise _Refused(f"member {_words(name)} has an absolute path")
    # The name as the archive gives it, "./" and all: a stricter count than the path
    # made on disk, and the one a person reading the archive's listing sees.
    if _bytes(name) > MAX_PATH_BYTES:
        raise _Refused(
            f"member {_words(name)} has a path of {_bytes(name)} bytes, over {MAX_PATH_BYTES}"
        )
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise _Refused(f"member {_words(name)} has a '..' component")
    if any(_bytes(p) > MAX_COMPONENT_BYTES for p in parts):
        raise _Refused(f"member {_words(name)} has a name over {MAX_COMPONENT_BYTES} bytes")
    levels = len(parts) if member.isdir() else len(parts) - 1
    if levels > MAX_DEPTH:
        raise _Refused(f"member {_words(name)} is {levels} directory levels deep, over {MAX_DEPTH}")
    return parts


_KINDS = {
    tarfile.SYMTYPE: "a symbolic link",
    tarfile.LNKTYPE: "a hard link",
    tarfile.CHRTYPE: "a character device",
    tarfile.BLKTYPE: "a block device",
    tarfile.FIFOTYPE: "a FIFO",
}


def _check_type(member: tarfile.TarInfo) -> None:
    if member.type in _FILE_TYPES or member.type == tarfile.DIRTYPE:
        return
    kind = _KINDS.get(member.type, f"of tar type {member.type!r}")
    raise _Refused(f"member {_words(member.name)} is {kind}")


def _open(archive: Path) -> tarfile.TarFile:
    with archive.open("rb") as f:
        magic = f.read(2)
    if magic == GZIP_MAGIC:
        return tarfile.open(archive, mode="r:gz", tarinfo=_BoundedTarInfo)
    return tarfile.open(archive, mode="r:", tarinfo=_BoundedTarInfo)


def unpack(
    archive: Path, dest: Path, *, max_bytes: int, max_members: int = DEFAULT_MAX_MEMBERS
) -> int:
    """Unpack ``archive`` into ``dest`` (which must not exist); the bytes of its files.

    ``dest``'s parent must exist and be on one file system with ``dest``. Raises
    :class:`ModelArchiveUnsafe` (nothing left behind) for an archive that breaks a
    rule of the module docstring, :class:`ModelStorageError` when the disk fails.
    Blocking: run it in a worker thread.
    """
    staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=dest.parent))
    try:
        os.chmod(staging, DIR_MODE)
        with _open(archive) as tar:
            total = _extract(tar, staging, max_bytes, max_members)
        os.rename(staging, dest)
    except _Refused as exc:
        _discard(staging)
        raise ModelArchiveUnsafe(f"unsafe model archive: {exc}") from exc
    except _READ_ERRORS as exc:
        _discard(staging)
        raise ModelArchiveUnsafe("the model artifact is not a readable tar archive") from exc
    except OSError as exc:
        _discard(staging)
        raise ModelStorageError(f"unpacking the model failed: {exc.strerror}", exc.errno) from exc
    except BaseException:
        _discard(staging)
        raise
    return total


def _discard(staging: Path) -> None:
    # Never raises: the error being reported matters more than the leftover.
    discard_tree(staging, event="model_unpack_cleanup_failed")


def _extract(tar: tarfile.TarFile, root: Path, max_bytes: int, max_members: int) -> int:
    total = members = 0
    with _Dirs(root) as dirs:
        for member in tar:
            members += 1
            if members > max_members:
                raise _Refused(f"more than {max_members} members")
            parts = member_parts(member)
            _check_type(member)
            _second_opinion(member, root)
            if not parts:
                continue  # "./": the archive's root, which is dest itself
            if member.isdir():
                dirs.open(parts, member.name)
                continue
            total += member.size
            if total > max_bytes:
                raise _Refused(f"files totalling more than {max_bytes} bytes")
            parent = dirs.open(parts[:-1], member.name)
            source = tar.extractfile(member)
            assert source is not None  # a regular file always has a reader
            with source:
                _write(parent, parts[-1], source, member.name)
    return total


def _second_opinion(member: tarfile.TarInfo, root: Path) -> None:
    # tarfile's extraction filters arrived in 3.11.4; Debian 12 ships 3.11.2. Every rule
    # of data_filter that matters here (no absolute path, no '..', no link, no device,
    # sane modes) is already enforced by this module before it, so the filter is only a
    # second opinion: asked when this Python has it, and its absence weakens nothing.
    data_filter: Callable[[tarfile.TarInfo, str], object] | None = getattr(
        tarfile, "data_filter", None
    )
    if data_filter is None:
        return
    try:
        data_filter(member, str(root))
    except tarfile.TarError as exc:  # FilterError (3.11.4+) derives from TarError
        raise _Refused(f"member {_words(member.name)} refused by tarfile: {exc}") from exc


def _conflict(name: str) -> _Refused:
    return _Refused(f"member {_words(name)} conflicts with an earlier member")


class _Dirs:
    """Directories under ``root`` by their components, made (``0755``) as needed.

    Holds ``root``'s descriptor and that of the last directory asked for (members of
    one directory tend to come together); :meth:`open` walks from ``root`` otherwise,
    one component at a time, never following a link.
    """

    def __init__(self, root: Path) -> None:
        self._root = os.open(root, _DIR_FLAGS)
        self._last: tuple[tuple[str, ...], int] | None = None

    def __enter__(self) -> _Dirs:
        return self

    def __exit__(self, *_: object) -> None:
        self._forget()
        os.close(self._root)

    def open(self, parts: list[str], name: str) -> int:
        """The descriptor of the directory ``parts``, valid until the next call.

        Raises ``_Refused`` when a component exists and is not a directory.
        """
        key = tuple(parts)
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        self._forget()
        fd = self._root
        try:
            for part in parts:
                child = _subdir(fd, part, name)
                if fd != self._root:
                    os.close(fd)
                fd = child
        except BaseException:
            if fd != self._root:
                os.close(fd)
            raise
        if fd != self._root:
            self._last = (key, fd)
        return fd

    def _forget(self) -> None:
        if self._last is not None:
            os.close(self._last[1])
            self._last = None


def _subdir(parent: int, part: str, name: str) -> int:
    """``part`` of ``parent`` opened as a directory, made ``0755`` if it was missing."""
    try:
        return os.open(part, _DIR_FLAGS, dir_fd=parent)
    except FileNotFoundError:
        pass
    except OSError as exc:
        # ENOTDIR: an earlier member made a file there. ELOOP cannot happen (no link is
        # ever made here) but would be refused alike.
        if exc.errno in (errno.ENOTDIR, errno.ELOOP):
            raise _conflict(name) from exc
        raise
    os.mkdir(part, DIR_MODE, dir_fd=parent)
    fd = os.open(part, _DIR_FLAGS, dir_fd=parent)
    os.fchmod(fd, DIR_MODE)  # the umask must not make it unreadable to the job
    return fd


def _write(parent: int, leaf: str, source: IO[bytes], name: str) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(leaf, flags, FILE_MODE, dir_fd=parent)
    except (FileExistsError, IsADirectoryError, NotADirectoryError) as exc:
        raise _conflict(name) from exc
    with os.fdopen(fd, "wb") as out:
        os.fchmod(fd, FILE_MODE)  # the umask must not make it unreadable to the job
        shutil.copyfileobj(source, out, _COPY_BYTES)
