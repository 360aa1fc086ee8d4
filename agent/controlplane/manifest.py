"""``result.manifest`` (docs/protocol.md §5) checked and parsed, and file names for the disk. Pure.

:func:`parse` turns a manifest whose field types the dispatcher has already checked
into a :class:`Manifest`, or says what is wrong with it. A wrong manifest is answered
``error`` / ``bad_message``: the CP could not store what it describes.

:func:`fs_name` maps a ``node_id`` or ``job_id`` to one directory name: as it is when
that is safe, else a digest, so that no name can climb out of the results directory.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from agent.controlplane.validate import JOB_ID, is_kind

_SHA256 = re.compile(r"[0-9a-f]{64}")
# Never ".", "..", a hidden name or a name with a separator; "+partial" and
# "+accepted" (the CP's own directories) are not safe either, so no node can be them.
_SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
_ENTRY_FIELDS = (("index", "int"), ("path", "str"), ("size", "int"), ("sha256", "str"))
MAX_COMPONENT_BYTES = 255  # NAME_MAX of the usual file systems
MAX_PATH_BYTES = 4096


@dataclass(frozen=True)
class ResultFile:
    index: int
    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    job_id: str
    files: tuple[ResultFile, ...]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def entries(self) -> list[dict[str, Any]]:
        """The ``files`` list, as JSON."""
        return [
            {"index": f.index, "path": f.path, "size": f.size, "sha256": f.sha256}
            for f in self.files
        ]


def fs_name(name: str) -> str:
    """One safe directory name for ``name`` (a node or job id); injective in practice."""
    if _SAFE_NAME.fullmatch(name):
        return name
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()
    return "~" + digest[:40]


def path_problem(path: str) -> str | None:
    """Why ``path`` may not name a result file, or ``None``: relative, ``/``-separated."""
    if not path:
        return "is empty"
    if path.startswith("/"):
        return "is absolute"
    try:
        raw = path.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid UTF-8"
    if len(raw) > MAX_PATH_BYTES:
        return f"is longer than {MAX_PATH_BYTES} bytes"
    if "\\" in path or "\x00" in path:
        return "holds a backslash or NUL"
    for part in path.split("/"):
        if part in ("", ".", ".."):
            return "has an empty, '.' or '..' component"
        # A character is at most 4 bytes of UTF-8: most parts need no encoding to tell.
        if len(part) * 4 > MAX_COMPONENT_BYTES and len(part.encode()) > MAX_COMPONENT_BYTES:
            return f"has a component longer than {MAX_COMPONENT_BYTES} bytes"
    return None


def parse(message: dict[str, Any]) -> Manifest | str:
    """The manifest in ``message`` (types of its top-level fields already checked), or why not.

    Checks: ``job_id`` well-formed; each entry an object with ``index`` (0..n-1, in
    order), ``path`` (see :func:`path_problem`; unique; never a directory of another
    entry), ``size`` (≥ 0) and ``sha256`` (64 lowercase hex digits); ``total_bytes``
    the sum of the sizes.
    """
    job_id = message["job_id"]
    if not JOB_ID.fullmatch(job_id):
        return "job_id is malformed"
    files: list[ResultFile] = []
    for i, entry in enumerate(message["files"]):
        where = f"files[{i}]"
        if not isinstance(entry, dict):
            return f"{where} is not a JSON object"
        index, path, size, sha = (
            entry.get("index"),
            entry.get("path"),
            entry.get("size"),
            entry.get("sha256"),
        )
        # type(...) is: a JSON true is a bool, never an int (validate.is_kind says so too).
        if (
            type(index) is not int
            or type(size) is not int
            or not isinstance(path, str)
            or not isinstance(sha, str)
        ):
            return _entry_type_problem(where, entry)
        if index != i:
            return f"{where}.index is {entry['index']}, expected {i}"
        problem = path_problem(path)
        if problem is not None:
            return f"{where}.path {problem}"
        if size < 0:
            return f"{where}.size is negative"
        if not _SHA256.fullmatch(sha):
            return f"{where}.sha256 is not 64 lowercase hex digits"
        files.append(ResultFile(i, path, size, sha))
    problem = _conflict([f.path for f in files])
    if problem is not None:
        return problem
    total = sum(f.size for f in files)
    if message["total_bytes"] != total:
        return f"total_bytes {message['total_bytes']} is not the sum of the sizes, {total}"
    return Manifest(job_id, tuple(files))


def _entry_type_problem(where: str, entry: dict[str, Any]) -> str:
    for name, kind in _ENTRY_FIELDS:
        if not is_kind(entry.get(name), kind):
            return f"{where}.{name} is missing or not {'an int' if kind == 'int' else 'a string'}"
    raise AssertionError(f"{where}: every field has its kind")


def _conflict(paths: list[str]) -> str | None:
    """Two entries that cannot both be files on disk: a repeat, or a file that is a directory."""
    seen: set[str] = set()
    directories: set[str] = set()
    for path in paths:
        if path in seen:
            return f"path {path!r} is listed twice"
        seen.add(path)
        parts = path.split("/")
        directories.update("/".join(parts[:n]) for n in range(1, len(parts)))
    clash = sorted(seen & directories)
    return f"path {clash[0]!r} is both a file and a directory" if clash else None
