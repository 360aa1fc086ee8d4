"""The review command's launcher: run as root, it builds the sandbox and execs the program.

Started by :mod:`agent.airlock.command` as ``python3 -I sandbox_exec.py SPEC STATUS_FD``
in a new session, with the per-review directory as its working directory. It imports
nothing of the agent (stdlib only, run by path): it is a fresh, single-threaded process,
so none of the fork-with-threads hazards of ``preexec_fn`` in the daemon apply.

What it does, in this order (docs/review-command.md has the reasons):

0. Set a parent-death ``SIGKILL``: the review dies with the agent.
1. ``unshare`` new network, mount, PID and IPC namespaces (ctypes: ``os.unshare`` is
   Python 3.12); every mount made private so nothing propagates back to the host.
2. ``fork`` the init: PID 1 of the new PID namespace, root, with a parent-death
   ``SIGKILL``. When it ends, or is killed (the caller kills the launcher's process
   group, and the init dies with the launcher), the kernel kills every process left
   in the namespace, whatever session or process group they made for themselves.
3. The init mounts a fresh ``/proc``, private tmpfs over ``/tmp``, ``/var/tmp``,
   ``/dev/shm`` (writable, small) and ``/run`` (empty, read-only), then forks the
   program's process, which sets the rlimits, drops supplementary groups,
   ``setgid`` / ``setuid`` to the job user, sets ``PR_SET_NO_NEW_PRIVS``, and execs
   the program with a minimal environment.
4. The init reaps, reports the program's raw wait status, and exits.

The status descriptor (close-on-exec in the program) carries JSON lines:
``{"status": WAITSTATUS}`` from the init, or ``{"setup": TEXT}`` when the sandbox
could not be built, or ``{"exec": TEXT}`` when the program could not be executed. The
launcher's own exit code means nothing to the caller: the program's exit 1 (refuse)
must never be confused with a failed ``unshare``.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import select
import signal
import sys
from typing import Any

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWNET = 0x40000000
CLONE_NEWPID = 0x20000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REC, MS_PRIVATE = 0x4000, 1 << 18
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38

# (target, tmpfs options); /run is hidden because it holds world-connectable Unix
# sockets (D-Bus, systemd-resolved's varlink) through which a program could make the
# host resolve a name: a network channel that a network namespace does not close.
TMPFS = (
    ("/tmp", "size=64m,mode=1777", 0),
    ("/var/tmp", "size=64m,mode=1777", 0),
    ("/dev/shm", "size=64m,mode=1777", 0),
    ("/run", "size=64k,mode=0755", MS_RDONLY),
)

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    _check(
        _libc.mount(
            source.encode(),
            target.encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        ),
        f"mount {target}",
    )


def _report(fd: int, **message: Any) -> None:
    os.write(fd, (json.dumps(message) + "\n").encode())


def _setup(status_fd: int, alive_r: int) -> None:
    """In the init, as root: tie its life to the launcher's, then mount."""
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PDEATHSIG)")
    # The launcher may have been killed before PDEATHSIG was set: its end of this pipe
    # is then closed and nothing would kill us later. getppid() cannot tell (it is 0
    # across the PID namespace boundary).
    ready, _, _ = select.select([alive_r], [], [], 0)
    if ready:
        os._exit(125)
    os.close(alive_r)
    base = MS_NOSUID | MS_NODEV
    _mount("proc", "/proc", "proc", base | MS_NOEXEC, None)
    for target, options, extra in TMPFS:
        if os.path.isdir(target):
            _mount("tmpfs", target, "tmpfs", base | extra, options)


def _program(spec: dict[str, Any], status_fd: int) -> None:
    """The program's process: drop everything, exec. Never returns."""
    try:
        for name, value in spec["rlimits"].items():
            resource.setrlimit(getattr(resource, name), (value, value))
        uid, gid = spec["uid"], spec["gid"]
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
        _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
    except OSError as exc:
        _report(status_fd, setup=str(exc))
        os._exit(125)
    try:
        # No shell: argv is the configured command, word for word.
        os.execvpe(spec["argv"][0], spec["argv"], spec["env"])  # noqa: S606
    except OSError as exc:
        _report(status_fd, exec=f"{spec['argv'][0]!r}: {exc.strerror}")
    os._exit(127)


def _init(spec: dict[str, Any], status_fd: int, alive_r: int) -> None:
    """PID 1 of the new namespace, root: builds the mounts, runs the program as PID 2
    (as PID 1 it would ignore its own default-action signals: ``abort()`` would not
    abort), reaps, and reports the program's wait status. Never returns."""
    try:
        _setup(status_fd, alive_r)
    except OSError as exc:
        _report(status_fd, setup=str(exc))
        os._exit(125)
    program = os.fork()
    if program == 0:
        _program(spec, status_fd)
    _quiet()
    while True:
        pid, status = os.wait()  # orphans are ours to reap too
        if pid == program:
            break
    _report(status_fd, status=status)
    # Our exit makes the kernel kill whatever the program left in the namespace.
    os._exit(0)


def _quiet() -> None:
    """The program's stdin and output pipes are its alone: the caller sees EOF on them
    when the namespace is gone, not when a launcher process exits."""
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


def main(argv: list[str]) -> int:
    spec, status_fd = json.loads(argv[1]), int(argv[2])
    os.set_inheritable(status_fd, False)  # the program must not hold it
    try:
        # An agent that dies mid-review takes the review with it (a restart reruns it);
        # checked after, as the agent may have died before the prctl.
        _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PDEATHSIG)")
        if os.getppid() != spec["parent"]:
            return 125
        _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC), "unshare")
        _mount("none", "/", None, MS_REC | MS_PRIVATE, None)
    except OSError as exc:
        _report(status_fd, setup=str(exc))
        return 125
    alive_r, alive_w = os.pipe()
    init = os.fork()
    if init == 0:
        os.close(alive_w)
        _init(spec, status_fd, alive_r)
    os.close(alive_r)
    _quiet()
    os.waitpid(init, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
