"""The ``results.review_command`` rule, kept out of :mod:`agent.config.models` (pure).

``review_command`` is an argv list (never a shell string: nothing is word-split or
expanded). Its first element is the program, an absolute path that must exist as a
regular file owned by root or by the agent's own user, and writable by nobody else: the
program decides what leaves the site, so whoever may change it may release results.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, ValidationInfo
from pydantic_core import PydanticCustomError

MAX_ARGS = 64
# Private to the sandbox (agent.airlock.sandbox_exec): the host's are not seen there.
HIDDEN = ("/tmp", "/var/tmp", "/dev/shm", "/run")
MAX_ARG_LEN = 4096


def _problem(kind: str, message: str, **ctx: Any) -> PydanticCustomError:
    return PydanticCustomError(kind, message, ctx)


def check_review_command(argv: list[str] | None, review: str | None) -> list[str] | None:
    """``argv`` unchanged, or raise the first problem with it (pydantic's error type, so
    ``check-config`` names the key). ``review`` is ``results.review`` (None when it was
    itself invalid: then only the argv is checked)."""
    if argv is None:
        return None
    if review == "none":
        raise _problem(
            "review_command_unused", "needs results.review: manual (it decides held results)"
        )
    if not argv or len(argv) > MAX_ARGS or any(not a or len(a) > MAX_ARG_LEN for a in argv):
        raise _problem(
            "review_command_argv",
            "must be a list of 1 to {n} non-empty strings (the program, then its arguments)",
            n=MAX_ARGS,
        )
    if any("\0" in a for a in argv):
        raise _problem("review_command_nul", "an argument holds a NUL byte")
    hidden = next((a for a in argv if _hidden_in_sandbox(a)), None)
    if hidden is not None:
        raise _problem(
            "review_command_hidden",
            "{path} is under a directory the review sandbox hides ({dirs}): the program "
            "would not find it; install it elsewhere (e.g. /usr/local/lib)",
            path=hidden,
            dirs=", ".join(HIDDEN),
        )
    program = Path(argv[0])
    if not program.is_absolute():
        raise _problem("review_command_relative", "{path} is not an absolute path", path=argv[0])
    try:
        info = program.stat()
    except OSError as exc:
        raise _problem(
            "review_command_missing", "{path}: {why}", path=argv[0], why=exc.strerror
        ) from None
    if not stat.S_ISREG(info.st_mode):
        raise _problem("review_command_not_file", "{path} is not a regular file", path=argv[0])
    if info.st_uid not in (0, os.geteuid()) or info.st_mode & 0o022:
        raise _problem(
            "review_command_writable",
            "{path} must be owned by root and writable by nobody else (it decides what "
            "leaves the site); fix with chown root {path} && chmod go-w {path}",
            path=argv[0],
        )
    return argv


def _hidden_in_sandbox(arg: str) -> bool:
    if not arg.startswith("/"):
        return False
    path = os.path.normpath(arg)
    return any(path == d or path.startswith(d + "/") for d in HIDDEN)


def _validate(value: list[str] | None, info: ValidationInfo) -> list[str] | None:
    return check_review_command(value, info.data.get("review"))


# The type of ``results.review_command`` (it must come after ``review`` in the model).
ReviewCommand = Annotated[list[str] | None, AfterValidator(_validate)]
