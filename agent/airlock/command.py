"""The consumer's own review program (``results.review_command``), sandboxed.

:func:`run_review_command` runs the program after the output gate, on the spooled
results, and turns how it ended into a :class:`CommandVerdict`:

- exit 0: ``approve``; exit 1: ``refuse``, the reason its stdout (cut to
  :data:`REASON_CHARS`, every control character escaped);
- any other exit, a signal, a program that cannot be executed, or the timeout:
  ``undecided``, the text saying why (the job stays held for a person).

The sandbox (docs/review-command.md): a host process, not a container (the program is
a host path run by a host interpreter), started by :mod:`agent.airlock.sandbox_exec`
in new network (a down loopback only), mount, PID and IPC namespaces, as the job
user with no supplementary groups, no new privileges, rlimits, a minimal environment,
and as working directory a read-only copy of the results
(:mod:`agent.airlock.sandbox_files`). The manifest is JSON on stdin. Output is read
to at most :data:`OUTPUT_CAP` bytes per stream and the rest drained and dropped, so a
program never blocks on a full pipe. On timeout (or cancellation) the launcher's
process group is killed; the program is PID 1 of its namespace, so the kernel then
kills every process it left, even one that made its own session.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import structlog

from agent.airlock.sandbox_files import ReviewSandboxError, stage, unstage
from agent.escaping import escape

log = structlog.get_logger(__name__)

OUTPUT_CAP = 64 * 1024  # bytes kept of stdout and of stderr each
REASON_CHARS = 2000  # characters of stdout kept as a refusal's reason
STDERR_CHARS = 300  # characters of stderr quoted in an undecided verdict
KILL_WAIT_S = 10.0  # for the pipes' EOF once the sandbox is killed (it takes milliseconds)
LAUNCHER = Path(__file__).with_name("sandbox_exec.py")
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/tmp", "TMPDIR": "/tmp"}


@dataclass(frozen=True)
class SandboxLimits:
    """The program's rlimits. ``cpu_s`` of CPU time on top of the wall-clock timeout
    (a busy loop is stopped by either); ``file_bytes`` caps any one file it writes (its
    only writable places are private tmpfs mounts, 64 MiB each)."""

    address_space: int = 4 << 30
    cpu_s: int = 60
    open_files: int = 256
    processes: int = 1024  # counted per uid, system-wide: the job containers' too
    file_bytes: int = 16 << 20


@dataclass(frozen=True)
class CommandVerdict:
    outcome: Literal["approve", "refuse", "undecided"]
    text: str  # refuse: the program's stdout (cut, escaped); undecided: why


def parse_user(user: str) -> tuple[int, int]:
    """``"uid:gid"`` as numbers; :class:`ReviewSandboxError` for anything else, and for
    uid or gid 0 (the program must not run as root)."""
    uid_s, sep, gid_s = user.partition(":")
    if not (sep and uid_s.isdigit() and gid_s.isdigit()):
        raise ReviewSandboxError(f"review command user must be 'uid:gid' numbers, not {user!r}")
    uid, gid = int(uid_s), int(gid_s)
    if uid == 0 or gid == 0:
        raise ReviewSandboxError("the review command must not run as root (uid or gid 0)")
    return uid, gid


async def run_review_command(
    argv: Sequence[str],
    user: str,
    files: Path,
    manifest: dict[str, Any],
    timeout_s: float,
    *,
    limits: SandboxLimits = SandboxLimits(),  # frozen: one shared default is safe
) -> CommandVerdict:
    """Run ``argv`` on the results of ``manifest`` (spooled under ``files``) as
    ``user`` (``"uid:gid"``) for at most ``timeout_s`` seconds, and return its verdict.

    Never raises for the program's own failures (those are ``undecided``). Raises
    :class:`ReviewSandboxError` (an :class:`~agent.errors.AgentError`) when the sandbox
    cannot be set up: a bad user, a spool that does not match the manifest, a kernel
    that refuses the namespaces; ``agent.paths.UnsafeName`` for a manifest path that
    is not plain. ``CancelledError`` kills the program and propagates. Leaves no
    process and no copy behind.
    """
    if not argv:
        raise ReviewSandboxError("the review command is empty")
    uid, gid = parse_user(user)
    root = await asyncio.to_thread(stage, files, manifest, gid)
    try:
        return await _run(list(argv), uid, gid, root, manifest, timeout_s, limits)
    finally:
        await asyncio.to_thread(unstage, root)


async def _run(
    argv: list[str],
    uid: int,
    gid: int,
    root: Path,
    manifest: dict[str, Any],
    timeout_s: float,
    limits: SandboxLimits,
) -> CommandVerdict:
    spec = {
        "argv": argv,
        "uid": uid,
        "gid": gid,
        "parent": os.getpid(),
        "env": ENV,
        "rlimits": {
            "RLIMIT_AS": limits.address_space,
            "RLIMIT_CPU": limits.cpu_s + int(timeout_s) + 1,
            "RLIMIT_NOFILE": limits.open_files,
            "RLIMIT_NPROC": limits.processes,
            "RLIMIT_FSIZE": limits.file_bytes,
            "RLIMIT_CORE": 0,
        },
    }
    status_r, status_w = os.pipe2(os.O_CLOEXEC)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-I",
            str(LAUNCHER),
            json.dumps(spec),
            str(status_w),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=root,
            env={},
            start_new_session=True,
            pass_fds=(status_w,),
        )
    except OSError as exc:
        os.close(status_r)
        raise ReviewSandboxError(f"cannot start the review sandbox: {exc}") from exc
    finally:
        os.close(status_w)
    io: asyncio.Future[Any] | None = None
    try:
        # All three were asked for as pipes above.
        assert proc.stdin is not None
        assert proc.stdout is not None
        assert proc.stderr is not None
        io = asyncio.ensure_future(
            asyncio.gather(
                _feed(proc.stdin, manifest),
                _capped(proc.stdout),
                _capped(proc.stderr),
                proc.wait(),
            )
        )
        done, _ = await asyncio.wait({io}, timeout=timeout_s)
        if not done:
            _kill(proc.pid)
            # The namespace dies with the launcher: its pipes reach EOF and the
            # transports close, instead of being left to the garbage collector.
            await asyncio.wait({io}, timeout=KILL_WAIT_S)
            return CommandVerdict("undecided", f"timed out after {timeout_s:g} s (killed)")
        _, out, err, _ = io.result()
        status = _read_status(status_r)
    except BaseException:
        _kill(proc.pid)
        if io is not None:
            # Best effort, then the original exception (a CancelledError too) goes on.
            with contextlib.suppress(BaseException):
                await asyncio.wait({io}, timeout=KILL_WAIT_S)
            io.cancel()
        raise
    finally:
        os.close(status_r)
    return _verdict(status, out, err)


def _kill(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # ended on its own meanwhile
        os.killpg(pgid, signal.SIGKILL)


async def _feed(stdin: asyncio.StreamWriter, manifest: dict[str, Any]) -> None:
    """Write the manifest and close; a program that does not read it is not an error."""
    try:
        stdin.write(json.dumps(manifest).encode())
        await stdin.drain()
        stdin.close()
        await stdin.wait_closed()
    except (BrokenPipeError, ConnectionResetError):
        pass


async def _capped(stream: asyncio.StreamReader) -> bytes:
    """Up to :data:`OUTPUT_CAP` bytes of ``stream``; the rest is read and dropped."""
    kept = bytearray()
    while chunk := await stream.read(65536):
        kept += chunk[: OUTPUT_CAP - len(kept)]
    return bytes(kept)


def _read_status(fd: int) -> dict[str, Any]:
    """The launcher's report. Every writer has closed it once the launcher was reaped
    (the program's copy is close-on-exec), so this read does not block."""
    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
    report: dict[str, Any] = {}
    for line in data.splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if isinstance(item, dict):
            report.update(item)
    return report


def _clip(raw: bytes, chars: int) -> str:
    text = raw.decode("utf-8", errors="replace").strip()
    if len(text) > chars:
        text = text[:chars] + "…"
    return escape(text)


def _verdict(report: dict[str, Any], out: bytes, err: bytes) -> CommandVerdict:
    if "setup" in report:
        raise ReviewSandboxError(f"cannot set up the review sandbox: {report['setup']}")
    if "exec" in report:
        return CommandVerdict("undecided", f"the review command could not be run: {report['exec']}")
    if "status" not in report:
        return CommandVerdict("undecided", "the review sandbox ended without a status")
    status = int(report["status"])
    stderr = f"; stderr: {_clip(err, STDERR_CHARS)}" if err.strip() else ""
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = str(number)
        return CommandVerdict("undecided", f"killed by signal {name}{stderr}")
    code = os.WEXITSTATUS(status)
    if code == 0:
        return CommandVerdict("approve", _clip(out, REASON_CHARS))
    if code == 1:
        return CommandVerdict("refuse", _clip(out, REASON_CHARS))
    log.info("review_command_undecided", exit_code=code, stderr=_clip(err, STDERR_CHARS))
    return CommandVerdict("undecided", f"exited with code {code} (0 approves, 1 refuses){stderr}")
