"""Peer-supplied names as paths: the one place where they are checked.

A job id, an artifact name or any other string from the control plane becomes a path
component only through :func:`child`, which proves that the result is a direct child of
its root: a single, non-empty component that is not ``.`` or ``..``, has no ``/`` or NUL,
encodes as UTF-8 and fits one file-name component (255 bytes). docs/protocol.md's job-id
pattern already excludes all of these; this is the second line, so that a looser pattern
or a new caller can never turn a name into ``rmtree(state_dir)`` (a review found exactly
that: a job id of ``..`` emptied the state directory).
"""

from __future__ import annotations

import os
from pathlib import Path

from agent.errors import AgentError

MAX_COMPONENT_BYTES = 255


class UnsafeName(AgentError):
    """A peer-supplied name that cannot be used as a path component under its root."""

    reason = "agent_error"


def check_component(name: str) -> str:
    """``name`` if it is usable as one path component, else raise :class:`UnsafeName`.

    The error's text says what is wrong without quoting the name (it is a peer's).
    """
    if not name or name in (".", ".."):
        raise UnsafeName("a name that is empty, '.' or '..' cannot be a path component")
    if "/" in name or "\0" in name:
        raise UnsafeName("a name with '/' or NUL cannot be a path component")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsafeName("a name that is not UTF-8 cannot be a path component") from None
    if len(encoded) > MAX_COMPONENT_BYTES:
        raise UnsafeName(f"a name over {MAX_COMPONENT_BYTES} bytes cannot be a path component")
    return name


def child(root: Path, name: str) -> Path:
    """``root / name``, proven to be a direct child of ``root``. Raises :class:`UnsafeName`.

    Pure: nothing is created, opened or resolved on disk, so the check holds before the
    caller creates, opens or removes anything.
    """
    path = root / check_component(name)
    # Belt and braces: the lexical parent must be root itself, whatever Path did.
    if os.path.normpath(path.parent) != os.path.normpath(root):
        raise UnsafeName("a name that leaves its directory cannot be a path component")
    return path
