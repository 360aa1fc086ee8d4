"""Safe unpacking of a model archive: a tar file, optionally gzip-compressed (PROTOCOL.md §6).

The archive's sha256 has been checked before it gets here, so its bytes are what the
control plane meant to send; this module makes sure that those bytes cannot hurt the
node. :func:`unpack` refuses, with :class:`~agent.errors.ModelArchiveUnsafe`, any
archive with:

- a member name that is absolute, has a ``..`` component, is empty, or is too long;
- a member that is not a regular file or a directory (symbolic and hard links, devices,
  FIFOs, GNU sparse files, …);
- two members for one path (a later member would silently replace an earlier one);
- more than ``max_members`` members, or regular files totalling more than ``max_bytes``;
- tar metadata (pax or GNU long-name headers) over :data:`MAX_META_BYTES`, which
  :mod:`tarfile` would otherwise read whole into memory;
- anything :func:`tarfile.data_filter` refuses, as a second opinion;
- bytes that are not a tar archive (or gzip of one) at all.

Nothing is extracted in place: members go into a fresh temporary directory next to
``dest``, which is renamed to ``dest`` only when every member passed. On any refusal
the temporary directory is removed and ``dest`` never appears.

Modes are normalised: directories ``0755``, files ``0644`` (readable by the job's
non-root user through the read-only bind mount), never setuid/setgid/sticky. Ownership
and timestamps from the archive are ignored: files belong to the agent's user (root in
production).
"""

from __future__ import annotations

import gzip
import os
import shutil
import stat
import tarfile
import tempfile
import zlib
from pathlib import Path
from typing import IO, Any

from agent.errors import ModelArchiveUnsafe, ModelStorageError

GZIP_MAGIC = b"\x1f\x8b"
MAX_META_BYTES = 1024 * 1024
MAX_NAME_BYTES = 4096
MAX_COMPONENT_BYTES = 255
DEFAULT_MAX_MEMBERS = 100_000
DIR_MODE = 0o755
FILE_MODE = 0o644
_COPY_BYTES = 1024 * 1024
_META_TYPES = frozenset(
    {tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE}
    | {tarfile.SOLARIS_XHDTYPE}
)
_FILE_TYPES = frozenset({tarfile.REGTYPE, tarfile.AREGTYPE})
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


def member_parts(member: tarfile.TarInfo) -> list[str]:
    """The path components of a member, ``.`` dropped. Raises ``_Refused``."""
    name = member.name
    if not name or "\x00" in name:
        raise _Refused("a member without a usable name")
    if name.startswith("/"):
        raise _Refused(f"member {_words(name)} has an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise _Refused(f"member {_words(name)} has a '..' component")
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES or any(
        len(p.encode("utf-8", "surrogateescape")) > MAX_COMPONENT_BYTES for p in parts
    ):
        raise _Refused(f"member {_words(name)} has a name too long for the file system")
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
        with _open(archive) as tar:
            total = _extract(tar, staging, max_bytes, max_members)
        _normalise(staging)
        os.rename(staging, dest)
    except _Refused as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise ModelArchiveUnsafe(f"unsafe model archive: {exc}") from exc
    except _READ_ERRORS as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise ModelArchiveUnsafe("the model artifact is not a readable tar archive") from exc
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise ModelStorageError(f"unpacking the model failed: {exc.strerror}", exc.errno) from exc
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return total


def _extract(tar: tarfile.TarFile, root: Path, max_bytes: int, max_members: int) -> int:
    total = members = 0
    for member in tar:
        members += 1
        if members > max_members:
            raise _Refused(f"more than {max_members} members")
        parts = member_parts(member)
        _check_type(member)
        try:
            tarfile.data_filter(member, str(root))
        except tarfile.FilterError as exc:
            raise _Refused(f"member {_words(member.name)} refused by tarfile: {exc}") from exc
        if not parts:
            continue  # "./": the archive's root, which is dest itself
        target = root.joinpath(*parts)
        if member.isdir():
            _mkdirs(target, member.name)
            continue
        total += member.size
        if total > max_bytes:
            raise _Refused(f"files totalling more than {max_bytes} bytes")
        _mkdirs(target.parent, member.name)
        source = tar.extractfile(member)
        assert source is not None  # a regular file always has a reader
        with source:
            _write(target, source, member.name)
    return total


def _conflict(name: str) -> _Refused:
    return _Refused(f"member {_words(name)} conflicts with an earlier member")


def _mkdirs(path: Path, name: str) -> None:
    try:
        path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        raise _conflict(name) from exc


def _write(target: Path, source: IO[bytes], name: str) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(target, flags, FILE_MODE)
    except (FileExistsError, IsADirectoryError, NotADirectoryError) as exc:
        raise _conflict(name) from exc
    with os.fdopen(fd, "wb") as out:
        os.fchmod(fd, FILE_MODE)  # the umask must not make it unreadable to the job
        shutil.copyfileobj(source, out, _COPY_BYTES)


def _normalise(root: Path) -> None:
    """Every directory 0755 (parents made implicitly too), every file 0644, nothing else."""
    os.chmod(root, DIR_MODE)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            # lstat: nothing here may be a link, and chmod must not follow one.
            kind = stat.S_IFMT(os.lstat(path).st_mode)
            if kind == stat.S_IFDIR:
                os.chmod(path, DIR_MODE)
            elif kind == stat.S_IFREG:
                os.chmod(path, FILE_MODE)
            else:
                raise _Refused("a member that is neither a regular file nor a directory")
