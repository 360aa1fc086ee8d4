"""``cloudbender-cp``: the job file, and the control socket only its owner may use.

The end-to-end tests with a real agent are in tests/docker/test_cp_cli.py.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.controlplane.jobfile import JobFileError, load_job_file
from tests.controlplane.cpcli import cp_command, running_cp
from tests.helpers import reachable
from tests.helpers.env import seconds
from tests.helpers.proc import REPO

EXAMPLE = REPO / "examples" / "job.yaml"
NOBODY = 65534
MINIMAL = "image: {ref: cloudbender-test/busybox:latest}\ndatastore: vitals\n"


def example_copy(into: Path) -> Path:
    """examples/job.yaml next to the model archive it names, built as its header says."""
    shutil.copy(EXAMPLE, into / "job.yaml")
    with tarfile.open(into / "model.tar.gz", "w:gz") as tar:
        tar.add(REPO / "examples" / "model", arcname=".")
    return into / "job.yaml"


def problems_of(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    with pytest.raises(JobFileError) as info:
        load_job_file(path)
    return info.value.problems


def test_the_example_job_file_loads(tmp_path: Path) -> None:
    job = load_job_file(example_copy(tmp_path))
    assert job.job_id == "example-hr-flags-001"
    assert job.image.ref == "cloudbender-test/busybox:latest"
    assert job.datastore == "vitals"
    assert job.resources is not None and job.resources.memory_mib == 128
    assert job.command is not None and job.command[:2] == ["sh", "-c"]


def test_a_job_without_id_gets_a_valid_fresh_one(tmp_path: Path) -> None:
    (tmp_path / "job.yaml").write_text(MINIMAL)
    first = load_job_file(tmp_path / "job.yaml").job_id
    second = load_job_file(tmp_path / "job.yaml").job_id
    assert first is not None and first.startswith("job-") and first != second


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (MINIMAL + "resources: {cpu: 1}\n", "resources.cpu: unknown key"),
        (MINIMAL + "timeout: 60\n", "timeout: unknown key"),
        ("image: {ref: x}\n", "datastore: required"),
        (MINIMAL + "timeout_s: '60'\n", "timeout_s: Input should be a valid integer"),
        (MINIMAL + "env: {N: 1}\n", "env.N: Input should be a valid string"),
        (MINIMAL + "timeout_s: 60\ntimeout_s: 6000\n", "duplicate key 'timeout_s'"),
        (MINIMAL + "resources: {cpus: 0.001}\n", "resources.cpus must be at least 0.01"),
        (MINIMAL + "job_id: ../up\n", "job_id must match"),
        (MINIMAL + "env: {'A=B': x}\n", "env names must match"),
        (MINIMAL + "model: {file: nowhere.tar}\n", "model.file: "),
        ("- a list\n", "(top level): must be a mapping"),
    ],
)
def test_a_malformed_job_file_is_refused_naming_the_key(
    tmp_path: Path, text: str, problem: str
) -> None:
    """Attack: a typo (`cpu:` for `cpus:`) that a lenient reader would drop, so the job
    runs without the limit its author wrote; or a value the node would refuse."""
    assert any(problem in p for p in problems_of(tmp_path, text))


def test_a_model_that_is_not_a_tar_is_refused(tmp_path: Path) -> None:
    (tmp_path / "model.bin").write_bytes(b"not a tar archive at all")
    found = problems_of(tmp_path, MINIMAL + "model: {file: model.bin}\n")
    assert found == [f"model.file: {tmp_path / 'model.bin'} is not a tar or tar.gz archive"]


def test_help_says_it_is_an_example_not_a_production_control_plane() -> None:
    for args in (["--help"], ["serve", "--help"]):
        done = subprocess.run([*cp_command(), *args], capture_output=True, text=True, check=True)
        assert "not a production control plane" in " ".join(done.stdout.lower().split())


def test_the_commands_say_when_no_server_listens(tmp_path: Path) -> None:
    done = subprocess.run(
        [*cp_command(), "jobs", "--control", str(tmp_path / "none.sock")],
        capture_output=True,
        text=True,
        timeout=seconds(30),
    )
    assert done.returncode == 1
    assert f"no control plane at {tmp_path / 'none.sock'}" in done.stderr


def test_an_invalid_job_file_exits_65_and_sends_nothing(tmp_path: Path) -> None:
    """Attack: as above, through the command line: nothing may reach the server."""
    (tmp_path / "bad.yaml").write_text(MINIMAL + "resources: {cpu: 1}\n")
    with running_cp(tmp_path) as cp:
        done = cp.run("submit", str(tmp_path / "bad.yaml"), "--node", "n1")
        assert done.returncode == 65, done.stderr
        assert "resources.cpu: unknown key" in done.stderr
        assert "nothing sent" in done.stderr
        assert cp.json("jobs") == {"ok": True, "jobs": []}
    assert [e["op"] for e in cp.events("cp.control_request")] == ["jobs"]


# -- the control socket ------------------------------------------------------------------


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory every user may enter (pytest's tmp_path is root's alone, which would
    hide the socket from other users whatever its own mode)."""
    with reachable.shared_dir("cp-cli-") as path:
        yield path


def as_nobody(socket_path: Path) -> str:
    """What user nobody gets from the socket: ``EACCES``, or the server's first line."""
    if os.geteuid() != 0:
        pytest.skip("acting as another user needs root")
    script = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n"
        f"    s.connect({str(socket_path)!r})\n"
        "except PermissionError:\n"
        "    print('EACCES'); sys.exit()\n"
        # The refusal, and the close, may come before the request is sent.
        "try:\n"
        '    s.sendall(b\'{"op": "nodes"}\\n\')\n'
        "except BrokenPipeError:\n"
        "    pass\n"
        "print(s.makefile().readline())\n"
    )
    # Debian's python: the venv's interpreter may live where nobody cannot read.
    python = shutil.which("python3", path="/usr/bin:/bin") or "python3"
    done = subprocess.run(
        [python, "-c", script], capture_output=True, text=True, user=NOBODY, timeout=seconds(30)
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_socket_is_owner_only_even_under_a_permissive_umask(
    tmp_path: Path, shared_dir: Path
) -> None:
    """Attack: the server started from a shell with umask 000; a socket created with
    the umask's mode would let every local user assign jobs and read results."""
    control = shared_dir / "cp.sock"
    with running_cp(tmp_path, control=control, umask=0) as cp:
        assert stat.S_IMODE(control.stat().st_mode) == 0o600
        assert as_nobody(control) == "EACCES"
        assert cp.json("nodes") == {"ok": True, "nodes": []}
    assert not control.exists()  # removed at exit


def test_another_user_is_refused_even_when_the_socket_mode_is_loosened(
    tmp_path: Path, shared_dir: Path
) -> None:
    """Attack: someone made the socket world-writable (a wrapper's chmod, an ACL); the
    peer check (SO_PEERCRED) must still refuse every user but the owner and root."""
    control = shared_dir / "cp.sock"
    with running_cp(tmp_path, control=control) as cp:
        control.chmod(0o666)
        answer = as_nobody(control)
        assert '"ok": false' in answer and "not allowed" in answer
        assert '"nodes"' not in answer
        assert [e["uid"] for e in cp.events("cp.control_refused")] == [NOBODY]


@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_a_control_path_that_is_not_a_socket_is_never_removed(tmp_path: Path, kind: str) -> None:
    """Attack: a file, or a symlink to one, planted at the socket path so that the
    server deletes it when it "clears a stale socket"."""
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me\n")
    control = tmp_path / "cp.sock"
    if kind == "file":
        shutil.copy(victim, control)
    else:
        control.symlink_to(victim)
    command = [*cp_command(), "serve", "--token-file", str(tmp_path / "t"), "--control"]
    (tmp_path / "t").write_text("a-token-of-sixteen-chars-or-more\n")
    done = subprocess.run(
        [*command, str(control), "--listen", "127.0.0.1:0"],
        capture_output=True,
        text=True,
        timeout=seconds(30),
    )
    assert done.returncode == 78
    assert "exists and is not a socket" in done.stderr
    assert control.is_symlink() == (kind == "symlink")
    assert control.read_text() == victim.read_text() == "keep me\n"


def test_a_live_socket_is_refused_and_a_stale_one_taken_over(tmp_path: Path) -> None:
    control = tmp_path / "cp.sock"
    with running_cp(tmp_path, control=control) as first:
        command = [*cp_command(), "serve", "--token-file", str(tmp_path / "cp-tokens")]
        second = subprocess.run(
            [*command, "--control", str(control), "--listen", "127.0.0.1:0"],
            capture_output=True,
            text=True,
            timeout=seconds(30),
        )
        assert second.returncode == 78
        assert "another control plane is listening there" in second.stderr
        assert first.json("nodes")["ok"] is True
        first.proc.kill()  # leaves its socket behind
        first.proc.wait(timeout=seconds(10))
    assert stat.S_ISSOCK(control.lstat().st_mode)
    with running_cp(tmp_path, control=control) as again:
        assert again.json("jobs") == {"ok": True, "jobs": []}
