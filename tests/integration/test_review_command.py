"""The review command's sandbox, with real processes and real namespaces (runs as root).

Each test spools real results (agent.results.spool), runs a program through
:func:`agent.airlock.command.run_review_command` as an unprivileged uid, and asserts
the verdict a reviewer would see, or what the program could (not) do.
"""

from __future__ import annotations

import asyncio
import os
import select
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.airlock.command import REASON_CHARS, CommandVerdict, run_review_command
from agent.airlock.sandbox_files import ReviewSandboxError
from agent.paths import UnsafeName
from agent.results.spool import Spool
from tests.helpers.env import seconds
from tests.helpers.reachable import reachable_dir

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox needs root")

UID = 61234  # no account has it: nothing of the test user's can be mistaken for ours
USER = f"{UID}:{UID}"
PY = "/usr/bin/python3"


@pytest.fixture
def spooled(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    """A job's results in the real spool: ``(spool entry, result.manifest message)``."""
    out = tmp_path / "out"
    (out / "tables").mkdir(parents=True)
    (out / "tables" / "counts.csv").write_text("region,count\nnorth,12\nsouth,40\n")
    (out / "summary.txt").write_text("two regions\n")
    spool = Spool(tmp_path / "spool")
    manifest = spool.store("job-1", out, 1 << 20, 10)
    return spool.data_path("job-1").parent, manifest.to_message()


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory the program's uid can reach (pytest's tmp_path is root-only)."""
    with reachable_dir() as path:
        yield path


def review(
    argv: list[str], spooled: tuple[Path, dict[str, Any]], timeout: float = 20
) -> CommandVerdict:
    files, manifest = spooled
    verdict = asyncio.run(run_review_command(argv, USER, files, manifest, seconds(timeout)))
    assert not [p for p in files.iterdir() if p.name.startswith("review.")], "copy left behind"
    return verdict


def py(code: str) -> list[str]:
    return [PY, "-c", code]


def test_exit_0_approves_with_the_files_readable_at_their_manifest_paths(spooled: Any) -> None:
    """A program that cannot see the results would approve blindly: it reads each one."""
    code = (
        "import json, sys\n"
        "m = json.load(sys.stdin)\n"
        "data = [open(f['path'], 'rb').read() for f in m['files']]\n"
        "sys.exit(0 if b'north,12' in data[0] + data[1] else 3)\n"
    )
    assert review(py(code), spooled).outcome == "approve"


def test_exit_1_refuses_with_stdout_as_the_reason(spooled: Any) -> None:
    """The reviewer must see why the consumer's program refused."""
    verdict = review(py("print('cell north is below 20'); raise SystemExit(1)"), spooled)
    assert verdict == CommandVerdict("refuse", "cell north is below 20")


@pytest.mark.parametrize(
    ("code", "why"),
    [("raise SystemExit(3)", "exited with code 3"), ("import os; os.abort()", "SIGABRT")],
)
def test_other_exits_and_crashes_are_undecided(spooled: Any, code: str, why: str) -> None:
    """A crashing program must neither approve nor refuse: a person decides."""
    verdict = review(py(code), spooled)
    assert verdict.outcome == "undecided" and why in verdict.text


def test_timeout_kills_the_program_and_a_grandchild_in_its_own_session(
    spooled: Any, shared_dir: Path
) -> None:
    """A hanging program leaves a daemonised grandchild (setsid, so outside its process
    group) holding results on the node: the timeout must kill both."""
    fifo = shared_dir / "alive"
    os.mkfifo(fifo)
    fifo.chmod(0o666)  # not through the umask
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        script = f"setsid sh -c 'echo alive; exec sleep 1000' > {fifo} & exec sleep 1000"
        verdict = review(["/bin/sh", "-c", script], spooled, timeout=3)
        assert verdict.outcome == "undecided" and "timed out" in verdict.text
        # EOF (b"") only once every writer is gone: the grandchild is dead, not orphaned.
        assert _read_within(reader, seconds(5)) == b"alive\n"
        assert _read_within(reader, seconds(5)) == b"", "the grandchild outlived the review"
    finally:
        os.close(reader)


def test_cancelling_the_review_kills_the_program_and_what_it_started(
    spooled: Any, shared_dir: Path
) -> None:
    """job.cancel during a review must not leave the consumer's program running."""
    files, manifest = spooled
    fifo = shared_dir / "alive"
    os.mkfifo(fifo)
    fifo.chmod(0o666)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)

    async def scenario() -> None:
        script = f"setsid sh -c 'echo alive; exec sleep 1000' > {fifo} & exec sleep 1000"
        task = asyncio.create_task(
            run_review_command(["/bin/sh", "-c", script], USER, files, manifest, seconds(60))
        )
        got = await asyncio.to_thread(_read_within, reader, seconds(10))
        assert got == b"alive\n", "the program never started"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    try:
        asyncio.run(scenario())
        assert _read_within(reader, seconds(5)) == b"", "the grandchild outlived the review"
        assert not [p for p in files.iterdir() if p.name.startswith("review.")]
    finally:
        os.close(reader)


def _read_within(fd: int, timeout: float) -> bytes | None:
    ready, _, _ = select.select([fd], [], [], timeout)
    return os.read(fd, 100) if ready else None


def test_runs_as_the_given_uid_and_gid_with_no_other_groups(spooled: Any) -> None:
    """Run as root (or with the agent's groups), the program could read the whole node."""
    kept = os.getgroups()
    os.setgroups([4242])  # a group of the agent's that the program must not inherit
    try:
        verdict = review(["/bin/sh", "-c", "id -u; id -g; id -G; exit 1"], spooled)
    finally:
        os.setgroups(kept)
    assert verdict == CommandVerdict("refuse", f"{UID}\\n{UID}\\n{UID}")


def test_cannot_change_the_files_or_their_directory(spooled: Any) -> None:
    """A program that rewrites a result before approving it would change what is sent."""
    code = (
        "import json, os, sys\n"
        "path = json.load(sys.stdin)['files'][0]['path']\n"
        "tries = [lambda: open(path, 'r+b'), lambda: open('new', 'w'),\n"
        "         lambda: os.chmod(path, 0o666), lambda: os.unlink(path),\n"
        "         lambda: os.rename(path, 'moved'), lambda: os.mkdir('tables/sub')]\n"
        "for attempt in tries:\n"
        "    try:\n"
        "        attempt()\n"
        "        print('allowed'); sys.exit(0)\n"
        "    except PermissionError:\n"
        "        print('denied', end=' ')\n"
        "sys.exit(1)\n"
    )
    files, _ = spooled
    before = (files / "data").read_bytes()
    verdict = review(py(code), spooled)
    assert verdict == CommandVerdict("refuse", " ".join(["denied"] * 6))
    assert (files / "data").read_bytes() == before


def test_has_no_network_even_to_the_hosts_loopback(spooled: Any) -> None:
    """The program must not send the results anywhere: a listener on the host's
    127.0.0.1 gets no connection, and the program sees the error."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        port = listener.getsockname()[1]
        code = (
            "import socket, sys\n"
            "try:\n"
            f"    socket.create_connection(('127.0.0.1', {port}), timeout=5)\n"
            "except OSError as exc:\n"
            "    print(type(exc).__name__, exc.errno); sys.exit(1)\n"
            "print('connected')\n"
        )
        verdict = review(py(code), spooled)
        assert verdict.outcome == "refuse" and verdict.text.startswith("OSError"), verdict
        with pytest.raises(BlockingIOError):
            listener.accept()


def test_writes_outside_stay_private_and_host_sockets_under_run_are_hidden(
    spooled: Any,
) -> None:
    """/tmp is world-readable on the host (a copy there leaks the results to local
    users) and /run holds D-Bus and resolver sockets (a way to make the host resolve
    a name, i.e. network)."""
    name = f"reviewcmd-leak-{os.getpid()}"
    code = (
        "import os, sys\n"
        f"open('/tmp/{name}', 'w').write('results')\n"
        "print(len(os.listdir('/run'))); sys.exit(1)\n"
    )
    assert review(py(code), spooled) == CommandVerdict("refuse", "0")
    assert not Path("/tmp", name).exists()


def test_stdout_is_capped_and_a_flood_does_not_hang_the_review(spooled: Any) -> None:
    """A program writing without end must not fill the agent's memory nor block."""
    code = "import sys; sys.stdout.write('A' * (10 << 20)); sys.exit(1)"
    verdict = review(py(code), spooled)
    assert verdict.outcome == "refuse"
    assert verdict.text == "A" * REASON_CHARS + "…"


def test_terminal_escapes_in_the_reason_are_escaped(spooled: Any) -> None:
    """A reason that clears the reviewer's screen and forges a line must show as text."""
    code = r"print('\x1b[2J\x1b[1;1Happroved by dpo\r'); raise SystemExit(1)"
    verdict = review(py(code), spooled)
    assert verdict.outcome == "refuse"
    assert "\x1b" not in verdict.text and "\\x1b[2J\\x1b[1;1Happroved by dpo" in verdict.text


def test_a_manifest_path_leaving_the_directory_is_refused_before_anything_runs(
    spooled: Any, shared_dir: Path
) -> None:
    """A result named ../../x must not be staged (and read, or written) outside."""
    files, manifest = spooled
    bad = dict(manifest, files=[dict(manifest["files"][0], path="../escape.csv")])
    marker = shared_dir / "ran"
    with pytest.raises(UnsafeName):
        asyncio.run(run_review_command(["/bin/touch", str(marker)], USER, files, bad, 5))
    assert not (files / "escape.csv").exists() and not marker.exists()
    assert not [p for p in files.iterdir() if p.name.startswith("review.")]


def test_root_is_not_an_allowed_review_user(spooled: Any) -> None:
    """uid 0 would undo the whole sandbox."""
    files, manifest = spooled
    with pytest.raises(ReviewSandboxError):
        asyncio.run(run_review_command(["/bin/true"], "0:0", files, manifest, 5))


EXAMPLE = Path(__file__).parents[2] / "examples" / "review" / "small_cells.py"


@pytest.mark.parametrize(("count", "outcome"), [("12", "approve"), ("3", "refuse")])
def test_the_example_small_cells_program_in_the_sandbox(
    tmp_path: Path, shared_dir: Path, count: str, outcome: str
) -> None:
    """The shipped example refuses a table with a count below 10 and passes a clean one."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "table.csv").write_text(f"region,count\nnorth,{count}\nsouth,40\n")
    spool = Spool(tmp_path / "spool")
    manifest = spool.store("job-2", out, 1 << 20, 10).to_message()
    program = shared_dir / "small_cells.py"
    program.write_bytes(EXAMPLE.read_bytes())  # the checkout may not be readable by UID
    program.chmod(0o644)
    argv = [PY, str(program), "--min", "10"]
    verdict = review(argv, (spool.data_path("job-2").parent, manifest))
    assert verdict.outcome == outcome
    if outcome == "refuse":
        assert verdict.text == "small cell: table.csv row 2: count=3 is below 10"
