"""The control socket: a small asyncio Unix-socket server, one request per connection.

Framing: the client sends one JSON object on one line (at most :data:`MAX_REQUEST`
bytes, within :data:`READ_TIMEOUT_S`), the server answers one JSON object on one line
and closes. A reply is ``{"ok": true, "message": ...}`` or ``{"ok": false, "code":
..., "error": ...}``; codes: ``refused`` (not root nor in the group: nothing was read
or done), ``bad_request``, ``too_large``, ``timeout``, ``busy`` (more than
:data:`MAX_CONNECTIONS` at once), ``internal``, and those of the commands
(:mod:`agent.control.commands`). A refusal is answered before the request is read, so
a client must read the reply even when its write failed (EPIPE). No input makes the
server raise; a handler's bug is logged and answered ``internal``.

The socket file: bound under umask 0077 (never wider than the owner for an instant),
then chowned to root and the group's gid (when the group exists) and chmodded 0660.
A socket file left by an agent that died is replaced; one another live agent answers
on is not (that agent would lose its controls): :meth:`ControlServer.start` raises.
:meth:`ControlServer.stop` removes the file, if it is still the one this server bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog

from agent.control.peer import Peer, peer_of, refusal
from agent.errors import AgentError

log = structlog.get_logger(__name__)

MAX_REQUEST = 64 * 1024
READ_TIMEOUT_S = 5.0
MAX_CONNECTIONS = 8
SOCKET_MODE = 0o660

Reply = dict[str, Any]
Handler = Callable[[Peer, dict[str, Any]], Awaitable[Reply]]


class ControlSocketError(AgentError):
    """The control socket could not be set up (its directory, a live owner, a chown)."""


def error_reply(code: str, error: str) -> Reply:
    return {"ok": False, "code": code, "error": error}


class ControlServer:
    """Serve ``handler`` on ``path`` for root and members of ``group``.

    Call :meth:`start` once, then :meth:`stop` (idempotent) from the same loop.
    """

    def __init__(self, path: Path, group: str, handler: Handler) -> None:
        self.path = path
        self.group = group
        self._handler = handler
        self._server: asyncio.AbstractServer | None = None
        self._inode: tuple[int, int] | None = None
        self._active = 0

    @property
    def group_gid(self) -> int | None:
        """The group's gid now (None when it does not exist on this host)."""
        try:
            return grp.getgrnam(self.group).gr_gid
        except KeyError:
            return None

    async def start(self) -> None:
        """Bind and listen. Raises :class:`ControlSocketError`."""
        sock = await asyncio.to_thread(self._bind)
        self._server = await asyncio.start_unix_server(self._serve, sock=sock, limit=MAX_REQUEST)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        with contextlib.suppress(OSError):
            info = self.path.lstat()
            if (info.st_dev, info.st_ino) == self._inode:
                self.path.unlink()
        self._inode = None

    def _bind(self) -> socket.socket:
        if not self.path.parent.is_dir():
            raise ControlSocketError(
                f"directory {self.path.parent} does not exist (the unit's RuntimeDirectory= "
                "makes /run/cloudbender-agent; elsewhere, create it)"
            )
        self._remove_stale()
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as exc:  # EMFILE, ENFILE, ENOBUFS: passing
            raise ControlSocketError(f"cannot set up {self.path}: {exc.strerror}") from exc
        try:
            # The mode the file is born with: the owner's only, never a moment wider.
            # 0077 is the daemon's own umask (agent.service.serve), so other threads
            # creating files meanwhile get what they always get.
            old = os.umask(0o077)
            try:
                sock.bind(str(self.path))
            finally:
                os.umask(old)
            info = self.path.lstat()
            self._inode = (info.st_dev, info.st_ino)
            gid = self.group_gid
            # Owner root (the daemon runs as root); a test daemon that is not root keeps
            # its own uid. No group on this host: root's group, so only root gets in.
            os.chown(self.path, os.geteuid(), gid if gid is not None else os.getegid())
            os.chmod(self.path, SOCKET_MODE)
            sock.listen(MAX_CONNECTIONS)
        except OSError as exc:
            sock.close()
            raise ControlSocketError(f"cannot set up {self.path}: {exc.strerror}") from exc
        return sock

    def _remove_stale(self) -> None:
        try:
            info = self.path.lstat()
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(info.st_mode):
            raise ControlSocketError(f"{self.path} exists and is not a socket; not replacing it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(1.0)
            probe.connect(str(self.path))
        except OSError:
            self.path.unlink()  # nobody answers: left by an agent that died
            log.info("control_socket_stale_removed", socket=str(self.path))
            return
        finally:
            probe.close()
        raise ControlSocketError(f"another process answers on {self.path}; not taking it over")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._active += 1
        try:
            reply = await self._answer(reader, writer)
            writer.write(json.dumps(reply, sort_keys=True).encode() + b"\n")
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass  # the caller went away; it gets no answer, the agent carries on
        finally:
            self._active -= 1
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Reply:
        if self._active > MAX_CONNECTIONS:
            return error_reply("busy", "too many control connections at once; try again")
        try:
            peer = peer_of(writer.get_extra_info("socket"))
        except OSError as exc:
            return error_reply("refused", f"cannot identify the caller ({exc.strerror})")
        why = refusal(peer, self.group_gid, self.group)
        if why is not None:
            # Refused before a byte of the request is read: nothing it says is acted on.
            log.warning("control_refused", uid=peer.uid, pid=peer.pid, why=why)
            return error_reply("refused", why)
        try:
            async with asyncio.timeout(READ_TIMEOUT_S):
                line = await reader.readline()
        except TimeoutError:
            return error_reply("timeout", f"no request line within {READ_TIMEOUT_S:g} s")
        except ValueError:  # asyncio's LimitOverrunError, rewrapped by readline
            return error_reply("too_large", f"a request is at most {MAX_REQUEST} bytes")
        request = _parse(line)
        if isinstance(request, str):
            return error_reply("bad_request", request)
        try:
            return await self._handler(peer, request)
        except Exception:
            log.exception("control_command_failed", uid=peer.uid)
            return error_reply("internal", "the agent failed to carry out the command; see its log")


def _parse(line: bytes) -> dict[str, Any] | str:
    """The request object, or why it is not one."""
    if not line.endswith(b"\n"):
        return "the request must be one JSON object ending with a newline"
    try:
        request = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "the request is not valid JSON"
    if not isinstance(request, dict) or not isinstance(request.get("command"), str):
        return 'the request must be a JSON object with a "command" string'
    return request
