"""``results.review_command`` end to end (issue 13, done means 4): a real daemon runs the
shipped example program (examples/review/small_cells.py) in its sandbox on held results."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from tests.docker.test_airlock import GROUP, _cli, _ledger, _result_frames, _wait_held
from tests.helpers.env import seconds
from tests.helpers.jobnode import JobNode, job_node
from tests.helpers.operator import runtime_dir
from tests.helpers.reachable import reachable_dir

pytestmark = pytest.mark.docker

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "review" / "small_cells.py"
PYTHON = "/usr/bin/python3"


@contextlib.contextmanager
def _node(tmp_path: Path, client: docker.DockerClient, **results: Any) -> Iterator[JobNode]:
    if not Path(PYTHON).exists():
        pytest.fail(f"{PYTHON} is needed to run the example review program")
    with runtime_dir() as run_dir:
        control = {"socket": str(run_dir / "control.sock"), "group": GROUP}
        with job_node(
            tmp_path, client, control=control, results={"review": "manual", **results}
        ) as node:
            yield node


def _counts(*rows: tuple[str, int]) -> str:
    body = "".join(f"{site},{n}\\n" for site, n in rows)
    return f"printf 'site,count\\n{body}' > /opt/output/counts.csv"


def _installed(directory: Path) -> Path:
    """The example where the sandbox can run it: a checkout may lie under /tmp (hidden
    in the sandbox) or be root-only."""
    program = directory / "small_cells.py"
    program.write_bytes(EXAMPLE.read_bytes())
    program.chmod(0o644)
    return program


def test_the_example_program_approves_a_safe_table_and_refuses_a_small_cell(
    tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    """Attack: a table with a count of 3 (one could single out the three patients)
    leaves because nobody was there to look. The consumer's own small-cell check must
    refuse it, with its reason in the ledger and not sent, while a safe table is
    released by the program alone (review_approvals: 1) and delivered."""
    with (
        reachable_dir() as shared,
        _node(
            tmp_path, docker_client, review_command=[PYTHON, str(_installed(shared)), "--min", "10"]
        ) as node,
    ):
        node.assign("j-safe", _counts(("north", 12), ("south", 40)))
        end = node.wait_end("j-safe")
        assert (end["state"], end["reason"]) == ("succeeded", "completed"), node.agent.log()[-4000:]
        assert "held" in node.states("j-safe")
        approved = [e for e in _ledger(node, "j-safe") if e["kind"] == "result_approved"]
        assert [e["reviewer"] for e in approved] == ["review_command"]

        node.assign("j-small", _counts(("north", 3), ("south", 40)))
        end = node.wait_end("j-small")
        assert (end["state"], end["reason"]) == ("failed", "result_refused"), node.agent.log()[
            -4000:
        ]
        assert _result_frames(node, "j-small") == []
        (refusal,) = [e for e in _ledger(node, "j-small") if e["kind"] == "result_refused"]
        assert refusal["reviewer"] == "review_command" and "3" in refusal["text"]
        assert "review_command" in _cli(node, "audit", "--job", "j-small").stdout


def test_a_review_command_that_hangs_times_out_and_leaves_the_job_to_a_person(
    tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    """Attack: the review program hangs (or is made to), and the job is either released
    by default or stuck for good. It must be killed at its timeout (half the review
    time left), recorded undecided, and the job stay held until a person releases it."""
    # 18 s of review time (scaled on a slow machine): the command gets half, the test
    # the other half to see it undecided and release the job.
    review_h = seconds(18) / 3600
    with _node(
        tmp_path, docker_client, review_command=["/bin/sleep", "1000"], review_timeout_h=review_h
    ) as node:
        node.assign("j-hang", _counts(("north", 12)))
        _wait_held(node, "j-hang")
        deadline = time.monotonic() + seconds(30)  # the command's half, and then some
        found: list[dict[str, Any]] = []
        while not found and time.monotonic() < deadline:
            time.sleep(0.2)
            found = [e for e in _ledger(node, "j-hang") if e["kind"] == "review_command_undecided"]
        assert found and "timed out" in found[0]["why"], node.agent.log()[-4000:]
        assert (
            "uploading" not in node.states("j-hang")
            and "0/1" in _cli(node, "review", "list").stdout
        )
        assert _cli(node, "review", "release", "j-hang").returncode == 0
        end = node.wait_end("j-hang")
        assert (end["state"], end["reason"]) == ("succeeded", "completed")
