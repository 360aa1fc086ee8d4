"""The CLI's side of the control socket: ``drain``, ``undrain``, ``cancel JOB``,
``reconnect``. One request line, one reply line (:mod:`agent.control.server`).

:func:`send` returns the daemon's words on success and raises, so that ``agent.cli``
can pick the exit code: :class:`ControlRefused` (the socket's mode or the daemon's
peer check turned the caller away: 77), :class:`ControlUnavailable` (no daemon
listens: 69), :class:`ControlFailed` (the daemon refused the command itself, such as an
unknown job: 1).
"""

from __future__ import annotations

import contextlib
import grp
import json
import socket
from pathlib import Path
from typing import Any

from agent.control.server import MAX_REQUEST
from agent.errors import AgentError

REPLY_TIMEOUT_S = 30.0


class ControlError(AgentError):
    """An operator's command did not happen; ``exit_code`` is the CLI's status for it."""

    exit_code = 1


class ControlUnavailable(ControlError):
    """No agent answers on the control socket."""

    exit_code = 69  # sysexits.h EX_UNAVAILABLE


class ControlRefused(ControlError):
    """The caller may not use the control socket."""

    exit_code = 77  # EX_NOPERM


class ControlFailed(ControlError):
    """The agent answered, and refused or could not carry out the command."""


def send(path: Path, command: str, job_id: str | None, *, group: str, **extra: str | None) -> str:
    """Ask the daemon on ``path``; its message. Raises the errors above. ``group`` is the
    configured group, named in the refusal when the socket's own cannot be read;
    ``extra``: further request fields (``why`` of ``review_refuse``), None ones left out."""
    request: dict[str, Any] = {"command": command}
    request.update({k: v for k, v in extra.items() if v is not None})
    if job_id is not None:
        request["job_id"] = job_id
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(REPLY_TIMEOUT_S)
        try:
            sock.connect(str(path))
        except PermissionError as exc:
            raise ControlRefused(_permission_words(path, group)) from exc
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise ControlUnavailable(
                f"no agent listens on {path} (is cloudbender-agent running? "
                "`systemctl status cloudbender-agent`)"
            ) from exc
        except OSError as exc:
            raise ControlUnavailable(f"cannot reach the agent on {path}: {exc.strerror}") from exc
        # A refusal is answered before the request is read, and the socket closed: the
        # write may then fail (EPIPE) while the answer waits to be read.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(json.dumps(request).encode() + b"\n")
        try:
            reply = _read_line(sock)
        except OSError as exc:
            raise ControlUnavailable(f"the agent on {path} did not answer: {exc}") from exc
    return _outcome(reply, path)


def _read_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n") and len(data) <= MAX_REQUEST:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def _outcome(raw: bytes, path: Path) -> str:
    try:
        reply = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ControlUnavailable(f"the agent on {path} sent no valid answer") from None
    if not isinstance(reply, dict):
        raise ControlUnavailable(f"the agent on {path} sent no valid answer")
    if reply.get("ok") is True:
        return str(reply.get("message", "done"))
    words = str(reply.get("error", "refused"))
    if reply.get("code") == "refused":
        raise ControlRefused(f"the agent refused: {words}")
    raise ControlFailed(words)


def _permission_words(path: Path, group: str) -> str:
    with contextlib.suppress(OSError, KeyError):
        group = grp.getgrgid(path.stat().st_gid).gr_name
    return (
        f"permission denied on {path}: only root and members of group {group!r} may "
        f"use it (add an operator with `usermod -aG {group} NAME`; they log in again)"
    )
