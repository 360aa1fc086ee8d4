"""The bearer token file: read, with its permissions and content checked, at every dial.

docs/protocol.md §1: the token is the stripped content of ``control_plane.token_file``. The
agent asks more of it than that, because the token ends up in an HTTP header and in a
log scrubber:

- the file is a regular file readable by its owner only (checked on the open file, at
  every read: a ``chmod`` after startup is caught at the next dial);
- at most 4 KiB;
- once stripped of surrounding whitespace, the token is at least
  :data:`MIN_TOKEN_LEN` characters of printable ASCII without spaces or control
  characters. A newline inside would make the header invalid, and the HTTP library's
  error would quote the header, token included; a short token would be hard to scrub
  from logs without masking ordinary words.

Errors name the file and what is wrong with it, never any of its content.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from agent.errors import AgentError

MIN_TOKEN_LEN = 16
MAX_TOKEN_FILE = 4096
_TOKEN_CHARS = frozenset(chr(c) for c in range(0x21, 0x7F))


class TokenFileError(AgentError):
    """The token file cannot be used. ``errno`` is set when reading it failed."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


def read_token(path: Path) -> str:
    """The token in ``path``. Raises :class:`TokenFileError` (never quoting the content)."""
    st, data = _read(path)
    _check_mode(path, st)
    return _token_in(path, data)


def token_file_problems(path: Path) -> list[TokenFileError]:
    """Every problem with the token file at once, for ``check-config``: its mode *and*
    its content (a 0644 file holding a short token is two fixes, not one then another).

    A file this user may not read (``check-config`` run as another user than the
    agent's) has its mode checked only; the daemon checks the content at every dial.
    Idempotent; raises nothing.
    """
    try:
        st, data = _read(path)
    except TokenFileError as exc:
        if exc.errno != errno.EACCES:
            return [exc]
        try:
            st, data = os.stat(path), None
        except OSError:
            return []
    problems = []
    try:
        _check_mode(path, st)
    except TokenFileError as exc:
        problems.append(exc)
    if data is not None:
        try:
            _token_in(path, data)
        except TokenFileError as exc:
            problems.append(exc)
    return problems


def _read(path: Path) -> tuple[os.stat_result, bytes]:
    """The file's status, checked on the open descriptor, and up to one byte more than
    :data:`MAX_TOKEN_FILE`. Raises :class:`TokenFileError`, without reading, for a file
    that cannot be opened or is not a regular file."""
    try:
        # O_NONBLOCK: opening a FIFO put in the token file's place must not hang the agent;
        # it has no effect on the regular file insisted on below.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as file:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise TokenFileError(f"{path} is not a regular file")
            return st, file.read(MAX_TOKEN_FILE + 1)
    except FileNotFoundError as exc:
        raise TokenFileError(f"{path} does not exist", exc.errno) from None
    except OSError as exc:
        raise TokenFileError(f"{path} cannot be read: {exc.strerror}", exc.errno) from None


def _token_in(path: Path, data: bytes) -> str:
    if len(data) > MAX_TOKEN_FILE:
        raise TokenFileError(f"{path} is larger than {MAX_TOKEN_FILE} bytes")
    return check_token(path, data)


def check_token(path: Path, data: bytes) -> str:
    """The token held in ``data``, the bytes of ``path``; raises :class:`TokenFileError`."""
    token = data.strip(b" \t\r\n\v\f").decode("latin-1")
    if not token:
        raise TokenFileError(f"{path} is empty")
    if not _TOKEN_CHARS.issuperset(token):
        raise TokenFileError(
            f"{path} holds whitespace, control or non-ASCII characters inside the token; "
            "it must hold the token alone, printable ASCII on one line"
        )
    if len(token) < MIN_TOKEN_LEN:
        raise TokenFileError(f"{path} holds a token shorter than {MIN_TOKEN_LEN} characters")
    return token


def _check_mode(path: Path, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise TokenFileError(f"{path} is not a regular file")  # os.stat follows links too
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise TokenFileError(
            f"{path} is accessible by group or others (mode {mode:04o}); the token file "
            f"must be readable by its owner only: chmod 600 {path}"
        )
