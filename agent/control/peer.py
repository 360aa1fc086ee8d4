"""Who is on the other end of the control socket, and whether they may use it.

The socket file's mode (0660, root:group) is the first gate; this is the second, and
the one that holds if the file's mode is ever loosened: the kernel's record of the
peer, taken at ``connect()``, not anything the peer says about itself.

Supplementary groups come from ``SO_PEERGROUPS`` (Linux 4.13): like ``SO_PEERCRED`` it
is the kernel's snapshot at ``connect()``, so it cannot be raced by the peer exiting
and its pid being reused, and it needs no access to ``/proc/<pid>``, which the unit's
``ProtectProc=invisible`` hides for processes of other users (the agent has no
CAP_SYS_PTRACE). Only when the kernel lacks it, or the peer has more groups than the
buffer holds, is ``/proc/<pid>/status`` read. ``os.getgrouplist`` of the peer's user is
never used: it says what ``/etc/group`` lists now, not the groups the calling process
holds (a member removed from the group keeps nothing; one just added has nothing until
they log in again, as with any Unix group).
"""

from __future__ import annotations

import errno
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

# Linux's number for it; not every Python's socket module names it.
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
_PEERGROUPS_BUF = 1024  # CPython's getsockopt buflen cap: 256 gids
_GID = struct.Struct("=I")


@dataclass(frozen=True)
class Peer:
    """The caller as the kernel saw it at ``connect()``."""

    pid: int
    uid: int
    gid: int
    groups: frozenset[int]


def peer_of(sock: socket.socket) -> Peer:
    """The peer of a connected ``AF_UNIX`` socket. Raises ``OSError`` if the kernel
    cannot say (the caller must then refuse)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return Peer(pid, uid, gid, _groups(sock, pid))


def _groups(sock: socket.socket, pid: int) -> frozenset[int]:
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, _PEERGROUPS_BUF)
    except OSError as exc:
        if exc.errno not in (errno.ENOPROTOOPT, errno.ERANGE, errno.EINVAL):
            raise
        return _proc_groups(pid)
    count = len(raw) // _GID.size
    return frozenset(_GID.unpack_from(raw, i * _GID.size)[0] for i in range(count))


def _proc_groups(pid: int) -> frozenset[int]:
    # Raises OSError (hidden /proc, a peer gone): the caller refuses, it does not guess.
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Groups:"):
            return frozenset(int(g) for g in line.split()[1:])
    return frozenset()


def refusal(peer: Peer, group_gid: int | None, group: str) -> str | None:
    """Why ``peer`` may not use the control socket, or None if it may: root always may;
    anyone else only with ``group`` as its primary or a supplementary group (and not at
    all when the group does not exist here, ``group_gid`` None). Pure."""
    if peer.uid == 0:
        return None
    if group_gid is not None and (peer.gid == group_gid or group_gid in peer.groups):
        return None
    if group_gid is None:
        return f"uid {peer.uid} is not root, and group {group!r} does not exist on this node"
    return f"uid {peer.uid} is neither root nor a member of group {group!r}"
