"""The local control channel of ``cloudbender-cp serve``: a Unix socket, JSON lines.

The server's commands (submit, jobs, watch, cancel, results, nodes) are taken here,
never over the agents' WebSocket: an agent's token must not be able to assign jobs.
Who may use the channel is decided twice, because either alone can be undone:

- the socket file is created with mode ``0600`` (bound under a ``0177`` umask, so it
  is never connectable by others, not even for an instant), so the kernel refuses
  ``connect`` to other users;
- each connection's peer is read with ``SO_PEERCRED`` before a byte is read from it,
  and only the server's own uid and root are served. A socket whose mode someone
  loosened, or a directory that hands it out, still admits no one else.

A socket path that exists is taken over only when it is a socket nobody answers on
(left by a server that was killed); a live server's socket is refused, and so is
anything that is not a socket (a regular file, a symlink planted there): it is never
unlinked. On :meth:`ControlChannel.stop` the socket is removed if it is still ours.

Wire format: the client sends one JSON object on one line, ``{"op": …, …}``; the
server answers with zero or more ``{"event": …}`` lines (``watch``) and then one
final line, ``{"ok": true, …}`` or ``{"ok": false, "error": "…"}``, and closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import socket
import stat
import struct
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import structlog

from agent.controlplane.errors import ControlPlaneError

log = structlog.get_logger(__name__)

SOCKET_NAME = "cloudbender-cp.sock"
# One request line; a job request is a few KiB (the assign frame's cap is 256 KiB).
MAX_REQUEST_BYTES = 1024 * 1024
# The owner's own client sends its request at once; a connection that sends nothing
# is closed rather than held forever.
REQUEST_TIMEOUT_S = 30.0

Handler = Callable[[dict[str, Any]], AsyncIterator[dict[str, Any]]]


class ControlChannelError(ControlPlaneError):
    """The control socket cannot be set up or used (path taken, not ours, gone)."""


def default_path() -> Path:
    """``$XDG_RUNTIME_DIR/cloudbender-cp.sock`` (a per-user 0700 directory), else
    ``./cloudbender-cp.sock``."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return Path(runtime) / SOCKET_NAME if runtime else Path(SOCKET_NAME)


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a connected Unix socket (SO_PEERCRED)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def peer_allowed(uid: int) -> bool:
    """The server's owner and root; nobody else."""
    return uid in (os.geteuid(), 0)


def _clear_stale(path: Path) -> None:
    """Remove ``path`` if it is a socket that nobody answers on; raise if it is in use
    or is not a socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlChannelError(f"{path} exists and is not a socket; not touching it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        path.unlink()  # a killed server's leftover
        return
    except OSError as exc:
        raise ControlChannelError(f"{path}: cannot check the socket: {exc.strerror}") from exc
    finally:
        probe.close()
    raise ControlChannelError(f"{path}: another control plane is listening there")


def bind_socket(path: Path) -> socket.socket:
    """A listening Unix socket at ``path``, mode 0600. Raises ``ControlChannelError``."""
    _clear_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise ControlChannelError(f"{path}: cannot listen there: {exc.strerror}") from exc
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(16)
    sock.setblocking(False)
    return sock


class ControlChannel:
    """Serves ``handler`` on a Unix socket at ``path``; see the module docstring.

    ``handler`` gets each request (a dict with ``op``) and yields the lines to send;
    a :class:`~agent.controlplane.errors.ControlPlaneError` it raises becomes the final
    ``{"ok": false, "error": …}`` line. :meth:`start` raises ``ControlChannelError``.
    """

    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self._handler = handler
        self._server: asyncio.AbstractServer | None = None
        self._inode: tuple[int, int] | None = None
        self._clients: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        sock = bind_socket(self.path)
        st = os.stat(self.path)
        self._inode = (st.st_dev, st.st_ino)
        self._server = await asyncio.start_unix_server(
            self._serve, sock=sock, limit=MAX_REQUEST_BYTES
        )
        log.info("cp.control_listening", path=str(self.path))

    async def stop(self) -> None:
        """Stop listening and remove the socket if it is still the one we made. Idempotent."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        # A watch may be open for ever; from 3.12 on wait_closed() would wait for it.
        for task in list(self._clients):
            task.cancel()
        await asyncio.gather(*self._clients, return_exceptions=True)
        await server.wait_closed()
        with contextlib.suppress(OSError):
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:
                self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        try:
            sock = writer.get_extra_info("socket")
            uid = peer_uid(sock)
            if not peer_allowed(uid):
                log.warning("cp.control_refused", uid=uid)
                await _send(writer, {"ok": False, "error": "not allowed: not the server's owner"})
                return
            await self._answer(reader, writer)
        except (ConnectionError, BrokenPipeError):
            pass  # the client went away (watch interrupted): nothing to tell it
        finally:
            self._clients.discard(task)
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), REQUEST_TIMEOUT_S)
            request = json.loads(line)
        except (TimeoutError, ValueError) as exc:
            # LimitOverrunError is a ValueError too (a line over MAX_REQUEST_BYTES).
            await _send(writer, {"ok": False, "error": f"bad request ({type(exc).__name__})"})
            return
        if not isinstance(request, dict) or not isinstance(request.get("op"), str):
            await _send(writer, {"ok": False, "error": "bad request: no op"})
            return
        # Owner's commands only, so the op is safe to log; what it carries may not be.
        log.info("cp.control_request", op=str(request["op"])[:40])
        try:
            async for answer in self._handler(request):
                await _send(writer, answer)
        except ControlPlaneError as exc:
            await _send(writer, {"ok": False, "error": str(exc)})


async def _send(writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
    writer.write(json.dumps(message).encode() + b"\n")
    await writer.drain()


def request(
    path: Path, message: dict[str, Any], timeout_s: float | None = 30.0
) -> Iterator[dict[str, Any]]:
    """Send one request to the server at ``path``; iterate over its answer lines.

    A generator: the connection stays open until the final line. ``timeout_s`` bounds
    each read (``None``: wait for ever, for ``watch``). Raises ``ControlChannelError``
    when nobody listens at ``path``, the caller may not use it, or the server hangs up.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout_s)
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise ControlChannelError(
                f"no control plane at {path} (start one with `cloudbender-cp serve`, "
                "or give its socket with --control)"
            ) from exc
        except PermissionError as exc:
            raise ControlChannelError(f"{path}: not allowed (the server's owner only)") from exc
        except OSError as exc:
            if exc.errno == errno.ENOTSOCK:
                raise ControlChannelError(f"{path} is not a control socket") from exc
            raise ControlChannelError(f"{path}: {exc.strerror}") from exc
        # A refused peer is answered and closed at once, maybe before this is sent:
        # the reason is still there to be read.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(json.dumps(message).encode() + b"\n")
        with sock.makefile("rb") as lines:
            for line in lines:
                answer = json.loads(line)
                yield answer
                if "ok" in answer:
                    return
        raise ControlChannelError(f"{path}: the server hung up without an answer")
    except TimeoutError as exc:
        raise ControlChannelError(f"{path}: no answer within {timeout_s:g}s") from exc
    except (ConnectionError, ValueError) as exc:
        raise ControlChannelError(f"{path}: the connection failed ({type(exc).__name__})") from exc
    finally:
        sock.close()
