"""The airlock end to end (issue 13): a real daemon, the reference control plane, real
containers, and ``review`` through the control socket as root and as other users."""

from __future__ import annotations

import contextlib
import hashlib
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
import yaml

from tests.helpers.env import seconds
from tests.helpers.jobnode import JobNode, job_node
from tests.helpers.operator import NOBODY, cli_as, operator_config, runtime_dir

pytestmark = pytest.mark.docker

GROUP, USERS_GID = "users", 100  # an existing group stands in for cloudbender-admin
SCRIPT = (
    "printf 'site,count\\nnorth,12\\nsouth,40\\n' > /opt/output/counts.csv && "
    "head -c 3000 /dev/urandom > /opt/output/weights.bin && "
    "cp /opt/output/weights.bin /tmp/w && sha256sum /tmp/w > /opt/output/weights.sha"
)


@contextlib.contextmanager
def _airlock(tmp_path: Path, client: docker.DockerClient, approvals: int) -> Iterator[JobNode]:
    with runtime_dir() as run_dir:
        control = {"socket": str(run_dir / "control.sock"), "group": GROUP}
        results = {"review": "manual", "review_approvals": approvals}
        with job_node(tmp_path, client, control=control, results=results) as node:
            yield node


@pytest.fixture
def one(tmp_path: Path, docker_client: docker.DockerClient) -> Iterator[JobNode]:
    with _airlock(tmp_path, docker_client, 1) as node:
        yield node


@pytest.fixture
def two(tmp_path: Path, docker_client: docker.DockerClient) -> Iterator[JobNode]:
    with _airlock(tmp_path, docker_client, 2) as node:
        yield node


def _cli(node: JobNode, *args: str) -> subprocess.CompletedProcess[str]:
    return node.cli(*args)


def _as(node: JobNode, groups: list[int], *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI as uid 65534 (not root), in ``groups``."""
    sock = Path(yaml.safe_load(node.config_path.read_text())["control"]["socket"])
    config = operator_config(sock.parent, sock, GROUP)
    return cli_as(NOBODY, NOBODY, groups, *args, "--config", str(config))


def _result_frames(node: JobNode, job_id: str) -> list[str]:
    """Every result.* frame the control plane recorded for ``job_id`` (binary ones too)."""
    state = node.cp.node(node.node_id)
    assert state is not None
    return [
        m.type
        for m in state.messages
        if m.type.startswith("result.") and m.data.get("job_id") in (job_id, None)
    ]


def _ledger(node: JobNode, job_id: str) -> list[dict[str, Any]]:
    shown = _cli(node, "audit", "--json", "--job", job_id)
    return [json.loads(line) for line in shown.stdout.splitlines()]


def _wait_held(node: JobNode, job_id: str) -> None:
    try:
        node.wait_state(job_id, "held")
    except Exception as exc:
        raise AssertionError(node.agent.log()[-8000:]) from exc


def _wait_listed(node: JobNode, job_id: str, within_s: float = 60) -> str:
    """``review list`` once it lists ``job_id`` (a restarted agent re-holds it)."""
    deadline = time.monotonic() + seconds(within_s)
    while True:
        listed = _cli(node, "review", "list")
        if job_id in listed.stdout:
            return listed.stdout
        assert time.monotonic() < deadline, listed.stdout + listed.stderr
        time.sleep(0.1)


def test_a_held_job_sends_nothing_until_released_then_delivers_the_same_bytes(
    one: JobNode,
) -> None:
    """Attack: the consumer's rule is that nothing leaves before a person has looked,
    but the agent streams results the moment the container exits. With review on, the
    job must stop at `held` with not one result.* frame sent; after `review release`
    the same bytes arrive, the job succeeds, and the ledger tells the story."""
    one.assign("j-held", SCRIPT)
    _wait_held(one, "j-held")
    listed = _wait_listed(one, "j-held")
    assert "3" in listed and "0/1" in listed  # three files, no approval yet
    shown = _cli(one, "review", "show", "j-held")
    assert shown.returncode == 0, shown.stderr
    assert "counts.csv" in shown.stdout and "CSV: 2 row(s); columns: site, count" in shown.stdout
    assert "weights.bin" in shown.stdout and "(binary: not shown)" in shown.stdout
    assert _result_frames(one, "j-held") == []  # looked at, still nothing sent
    assert "held" in _cli(one, "jobs").stdout
    _, metrics = one.agent.get("/metrics")
    assert "cloudbender_jobs_held 1.0" in metrics.decode()
    assert one.agent.get("/healthz")[0] == 200  # waiting for a person is not a fault
    status = _cli(one, "status")
    assert "Held results   1 job(s), the oldest waiting 0h00m" in status.stdout, status.stdout

    released = _cli(one, "review", "release", "j-held")
    assert released.returncode == 0, released.stderr
    end = one.wait_end("j-held")
    assert (end["state"], end["reason"], end["exit_code"]) == ("succeeded", "completed", 0)
    assert one.states("j-held")[-3:] == ["held", "uploading", "succeeded"]
    assert one.result("j-held", "counts.csv") == b"site,count\nnorth,12\nsouth,40\n"
    digest = one.result("j-held", "weights.sha").split()[0].decode()
    assert hashlib.sha256(one.result("j-held", "weights.bin")).hexdigest() == digest
    kinds = [e["kind"] for e in _ledger(one, "j-held")]
    assert kinds.index("result_held") < kinds.index("result_approved")
    assert kinds.index("result_released") < kinds.index("result_file_sent")
    story = _cli(one, "audit", "--job", "j-held").stdout
    assert "held for review: 3 file(s)" in story and "approved by uid 0" in story


def test_a_refusal_ends_the_job_result_refused_deletes_the_spool_and_tells_no_words(
    one: JobNode,
) -> None:
    """Attack: the reviewer refuses results that would disclose small cells, but they
    leave anyway, or stay on disk, or the reviewer's note (which names the patients'
    cohort) reaches the provider. The job must end failed/result_refused with its exit
    code, nothing sent, the spool removed, and the words only in the local ledger."""
    one.assign("j-no", SCRIPT)
    _wait_held(one, "j-no")
    _wait_listed(one, "j-no")
    assert (one.state_dir / "spool" / "j-no").exists()
    refused = _cli(one, "review", "refuse", "j-no", "--why", "cell north below 10 (cohort X)")
    assert refused.returncode == 0, refused.stderr
    end = one.wait_end("j-no")
    assert (end["state"], end["reason"], end["exit_code"]) == ("failed", "result_refused", 0)
    assert _result_frames(one, "j-no") == []
    assert not (one.state_dir / "spool" / "j-no").exists()
    state = one.cp.node(one.node_id)
    assert state is not None
    assert "cohort" not in json.dumps([m.data for m in state.messages])
    (refusal,) = [e for e in _ledger(one, "j-no") if e["kind"] == "result_refused"]
    assert (refusal["reviewer"], refusal["text"]) == (0, "cell north below 10 (cohort X)")
    assert "no job is held" in _cli(one, "review", "list").stdout


def test_two_approvals_need_two_uids_and_an_outsider_changes_nothing(two: JobNode) -> None:
    """Attack: the four-eyes rule is beaten by one operator releasing twice, or by any
    local user (uid 65534, not in the control group) releasing. The same uid twice
    must count once, the outsider be refused (exit 77) with nothing recorded, and only
    a second, different member's release let the results go."""
    two.assign("j-4eyes", SCRIPT)
    _wait_held(two, "j-4eyes")
    _wait_listed(two, "j-4eyes")
    first = _cli(two, "review", "release", "j-4eyes")
    assert first.returncode == 0 and "1/2" in first.stdout, first.stderr
    again = _cli(two, "review", "release", "j-4eyes")
    assert again.returncode == 0 and "counted once" in again.stdout, again.stderr
    assert "1/2" in _cli(two, "review", "list").stdout
    outsider = _as(two, [], "review", "release", "j-4eyes")
    assert outsider.returncode == 77, outsider.stderr
    peek = _as(two, [], "review", "show", "j-4eyes")
    assert peek.returncode == 77 and "site,count" not in peek.stdout
    assert "uploading" not in two.states("j-4eyes")
    approvals = [e for e in _ledger(two, "j-4eyes") if e["kind"] == "result_approved"]
    assert [e["reviewer"] for e in approvals] == [0]

    member = _as(two, [USERS_GID], "review", "release", "j-4eyes")
    assert member.returncode == 0 and "released" in member.stdout, member.stderr
    end = two.wait_end("j-4eyes")
    assert (end["state"], end["reason"]) == ("succeeded", "completed")
    approvals = [e for e in _ledger(two, "j-4eyes") if e["kind"] == "result_approved"]
    assert [e["reviewer"] for e in approvals] == [0, NOBODY]


def test_a_held_job_survives_sigkill_with_its_approvals_and_delivers_once(two: JobNode) -> None:
    """Attack (crash): the agent dies (SIGKILL) while results wait for the second
    reviewer. A restart must neither lose the job, nor drop the first approval (making
    the reviewers start over), nor send the results without the second; once released
    they must be delivered exactly once."""
    two.assign("j-crash", SCRIPT)
    _wait_held(two, "j-crash")
    _wait_listed(two, "j-crash")
    assert _cli(two, "review", "release", "j-crash").returncode == 0
    two.agent.proc.kill()
    assert two.respawn() == -9
    listed = _wait_listed(two, "j-crash")
    assert "1/2 (uid 0)" in listed
    assert _result_frames(two, "j-crash") == []
    assert _as(two, [USERS_GID], "review", "release", "j-crash").returncode == 0
    end = two.wait_end("j-crash")
    assert (end["state"], end["reason"]) == ("succeeded", "completed")
    assert _result_frames(two, "j-crash").count("result.manifest") == 1
    assert two.result("j-crash", "counts.csv") == b"site,count\nnorth,12\nsouth,40\n"


def test_review_show_escapes_what_the_job_wrote(one: JobNode) -> None:
    """Attack: the job writes a text result whose lines hold terminal escape sequences
    (clear the screen, set the title, move the cursor up and print `approved`), so that
    the reviewer's `review show` displays something other than what would leave. Every
    control character must be shown escaped, none raw."""
    one.assign(
        "j-esc",
        "printf 'ok\\033[2J\\033]0;pwned\\007\\n\\033[1A\\033[2Kall clear\\n' "
        "> /opt/output/notes.txt",
    )
    _wait_held(one, "j-esc")
    _wait_listed(one, "j-esc")
    shown = _cli(one, "review", "show", "j-esc")
    assert shown.returncode == 0, shown.stderr
    assert "\x1b" not in shown.stdout and "\x07" not in shown.stdout
    assert "| ok\\x1b[2J\\x1b]0;pwned\\x07" in shown.stdout
    assert "| \\x1b[1A\\x1b[2Kall clear" in shown.stdout
