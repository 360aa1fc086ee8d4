"""The airlock's parts without a daemon (issue 13): the ``held`` state, the config rule
for ``review_command``, the approvals in the job store, the hold's decisions (with a
stub ``review_command``), and ``review show``'s escaping."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import ValidationError

from agent.airlock.approvals import ApprovalStore
from agent.airlock.hold import Airlock, ResultRefused, ReviewTimedOut
from agent.airlock.review import render_show
from agent.audit import AuditLedger, ledger_path, read
from agent.config.models import ResultsConfig
from agent.jobs.model import State, TransitionError, check_transition
from agent.jobs.store import AuditAnchor, JobRecord, JobStore, store_path
from agent.results.scan import ResultFile
from agent.results.spool import Manifest, Spool
from tests.helpers.reachable import reachable_dir

JOB = "j-1"


def test_held_comes_between_running_and_uploading_and_may_be_skipped() -> None:
    """A node that reviews results reports `held`; one that does not goes straight
    from running to uploading. Nothing may go back to running, or skip uploading."""
    check_transition(State.RUNNING, State.HELD)
    check_transition(State.HELD, State.UPLOADING)
    check_transition(State.RUNNING, State.UPLOADING)
    check_transition(State.HELD, State.FAILED, "result_refused")
    check_transition(State.HELD, State.CANCELLED, "cancel_requested")
    for bad in (
        (State.HELD, State.RUNNING),
        (State.HELD, State.SUCCEEDED),
        (State.PREPARING, State.HELD),
    ):
        with pytest.raises(TransitionError):
            check_transition(*bad)


def test_review_command_must_be_an_absolute_program_only_root_may_change(tmp_path: Path) -> None:
    """Attack: `review_command` names a script any local user can rewrite (or a bare name
    found on PATH), so whoever edits it approves every result. check-config must refuse
    it, and a command with review off (it would never run), and one under a directory the
    sandbox hides (it would never be found: every job left for a person)."""
    hidden = tmp_path / "check.py"
    hidden.write_text("#!/bin/sh\nexit 0\n")
    with reachable_dir() as home:
        program = home / "check.py"
        program.write_text("#!/bin/sh\nexit 0\n")
        program.chmod(0o755)
        argv = [str(program), "-v"]
        ok = ResultsConfig.model_validate({"review": "manual", "review_command": argv})
        assert ok.review_command == argv
        program.chmod(0o777)
        for review, argv, words in (
            ("manual", [str(program)], "writable by nobody else"),
            ("manual", ["check.py"], "not an absolute path"),
            ("manual", [str(home / "gone")], "No such file"),
            ("manual", [], "non-empty strings"),
            ("none", ["/bin/true"], "needs results.review: manual"),
            ("manual", [str(hidden)], "the review sandbox hides"),
            ("manual", ["/usr/bin/python3", "/run/x.py"], "the review sandbox hides"),
        ):
            with pytest.raises(ValidationError, match=words):
                ResultsConfig.model_validate({"review": review, "review_command": argv})
    with pytest.raises(ValidationError):
        ResultsConfig.model_validate({"review_approvals": 0})


def test_an_existing_job_store_gains_the_review_tables_and_keeps_its_jobs(tmp_path: Path) -> None:
    """An agent upgraded with jobs in its store: opening the approvals must add the
    tables without touching the jobs, and one reviewer's vote counts once."""
    path = store_path(tmp_path)
    jobs = JobStore(path)
    jobs.insert(JobRecord(JOB, State.RUNNING, {"job_id": JOB}, 1.0, 1.0))
    jobs.close()
    approvals = ApprovalStore(path)
    assert approvals.hold(JOB, 10.0) == 10.0
    assert approvals.hold(JOB, 99.0) == 10.0  # after a restart: the first hold's time
    assert approvals.vote(JOB, "0", "release", 11.0) is True
    assert approvals.vote(JOB, "0", "release", 12.0) is False
    assert [v.reviewer for v in approvals.votes(JOB)] == ["0"]
    approvals.close()
    again = JobStore(path)
    got = again.get(JOB)
    assert got is not None and got.state is State.RUNNING
    again.close()
    with sqlite3.connect(path) as db:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"jobs", "review_holds", "review_decisions"} <= tables


@dataclass
class Verdict:
    outcome: str
    text: str


class Rig:
    """An airlock over a real spool, store and ledger, with a settable config and clock."""

    def __init__(self, tmp_path: Path, **results: Any) -> None:
        self.results = ResultsConfig.model_validate({"review": "manual", **results})
        self.now = time.time()
        self.spool = Spool(tmp_path / "spool")
        out = tmp_path / "out"
        out.mkdir()
        (out / "counts.csv").write_text("site,count\nnorth,3\nsouth,40\n")
        self.manifest = self.spool.store(JOB, out, 10**6, 10)
        self.ledger = AuditLedger(ledger_path(tmp_path), AuditAnchor(store_path(tmp_path)))
        self.store = ApprovalStore(store_path(tmp_path))
        self.states: list[State] = []
        self.calls: list[tuple[list[str], str, float]] = []
        self.verdict: Verdict | None = None
        self.airlock = Airlock(
            lambda: self.results,
            self.store,
            self.spool,
            self.ledger,
            lambda: "65534:65534",
            self._command,
            clock=lambda: self.now,
        )
        self.job: Any = SimpleNamespace(
            job_id=JOB, image_ref="img", datastore=SimpleNamespace(name="ds")
        )
        self.cancel = asyncio.Event()

    async def _command(
        self, argv: Any, user: str, files: Path, mf: dict[str, Any], t: float
    ) -> Verdict:
        self.calls.append((list(argv), user, t))
        assert mf["files"][0]["path"] == "counts.csv" and (files / "manifest.json").exists()
        assert self.verdict is not None
        return self.verdict

    async def _spooled(self) -> Manifest:
        return self.manifest

    async def _transition(self, state: State, reason: str | None, code: int | None) -> None:
        self.states.append(state)

    async def hold(self, then: Any = None) -> bool:
        """Run the hold; ``then(airlock)`` runs once it is held (as a reviewer would)."""
        task = asyncio.ensure_future(
            self.airlock.hold(self.job, self._spooled, self._transition, self.cancel)
        )
        while self.airlock.get(JOB) is None and not task.done():  # noqa: ASYNC110 - polls a dict
            await asyncio.sleep(0)
        if then is not None and not task.done():
            await then(self.airlock)
        return await asyncio.wait_for(task, 10)

    def kinds(self) -> list[str]:
        return [e["kind"] for e in read(self.ledger.path)]


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path, review_approvals=2)
    yield r
    r.store.close()
    r.ledger.close()


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def test_two_approvals_need_two_reviewers_and_the_same_one_counts_once(rig: Rig) -> None:
    """Attack: the four-eyes rule (review_approvals: 2) beaten by one operator releasing
    twice. The hold must stay until a second, different reviewer releases."""

    async def reviewers(airlock: Airlock) -> None:
        airlock.vote(JOB, "1000", "release")
        airlock.vote(JOB, "1000", "release")
        await _settle()
        assert airlock.get(JOB) is not None  # still held
        airlock.vote(JOB, "1001", "release")

    assert asyncio.run(rig.hold(reviewers)) is True
    assert rig.states == [State.HELD]
    assert rig.kinds() == ["result_held", "result_released"]
    (released,) = [e for e in read(rig.ledger.path) if e["kind"] == "result_released"]
    assert released["reviewers"] == ["1000", "1001"]


def test_a_refusal_by_anyone_ends_it_and_removes_the_spool(rig: Rig) -> None:
    """Attack: one reviewer refuses, another releases afterwards and the results go. A
    refusal must end the hold for good and delete the spooled copy."""

    async def reviewers(airlock: Airlock) -> None:
        airlock.vote(JOB, "1000", "release")
        airlock.vote(JOB, "1001", "refuse")
        airlock.vote(JOB, "1002", "release")

    with pytest.raises(ResultRefused):
        asyncio.run(rig.hold(reviewers))
    assert rig.spool.load(JOB) is None


def test_the_review_deadline_counts_from_the_first_hold_across_a_restart(rig: Rig) -> None:
    """Attack: an agent restarted every day restarts the 72 h review clock, so held
    results never time out. The deadline must count from the hold in the store."""
    rig.store.hold(JOB, rig.now)  # held by the agent before the restart
    rig.now += 72 * 3600 + 1
    with pytest.raises(ReviewTimedOut):
        asyncio.run(rig.hold())
    assert rig.spool.load(JOB) is None
    assert rig.calls == []  # the command ran at the first hold, not again


def test_review_command_approves_once_refuses_with_its_words_or_leaves_it_to_a_person(
    tmp_path: Path,
) -> None:
    """The consumer's program decides first: approve is one approval by review_command,
    refuse ends it with its stdout in the ledger (not sent), anything else leaves the
    job held for a person. Its argv and user come from the config as reloaded."""
    for outcome in ("approve", "refuse", "undecided"):
        rig = Rig(tmp_path / outcome, review_command=["/bin/true", "--min", "10"])
        rig.verdict = Verdict(outcome, "north: 3 < 10")

        async def person(airlock: Airlock, outcome: str = outcome) -> None:
            await _settle()
            if outcome == "undecided":
                assert airlock.get(JOB) is not None
                airlock.vote(JOB, "0", "release")

        if outcome == "refuse":
            with pytest.raises(ResultRefused):
                asyncio.run(rig.hold(person))
            (entry,) = [e for e in read(rig.ledger.path) if e["kind"] == "result_refused"]
            assert (entry["reviewer"], entry["text"]) == ("review_command", "north: 3 < 10")
        else:
            assert asyncio.run(rig.hold(person)) is True
        (call,) = rig.calls
        assert call[:2] == (["/bin/true", "--min", "10"], "65534:65534") and call[2] <= 600
        votes = {(v.reviewer, v.decision) for v in rig.store.votes(JOB)}
        expect = {"approve": ("review_command", "release"), "refuse": ("review_command", "refuse")}
        assert votes == ({expect[outcome]} if outcome in expect else {("0", "release")})
        rig.store.close()
        rig.ledger.close()


def test_a_cancel_while_held_ends_it_and_removes_the_spool(rig: Rig) -> None:
    """`job.cancel` during held: the hold must end (cancelled), nothing kept."""

    async def cancel(_airlock: Airlock) -> None:
        rig.cancel.set()

    assert asyncio.run(rig.hold(cancel)) is False
    assert rig.spool.load(JOB) is None


def test_review_show_escapes_names_and_contents_and_describes_binary(rig: Rig) -> None:
    """Attack: a result's name or text holds `ESC [2J` / OSC title sequences and a bidi
    override, so that the reviewer sees something other than what would leave. Every
    such character must be printed escaped; a binary file described, not printed."""
    data = rig.spool.data_path(JOB)
    evil = b"ok\x1b[2J\x1b]0;pwned\x07\xe2\x80\xae\n" + b"x" * 500 + b"\n"
    blob = b"\x00\x01binary"
    with data.open("ab") as fh:
        fh.write(evil + blob)
    first = rig.manifest.files[0]
    files = (
        first,
        ResultFile(1, "a\x1b[1Ab.txt", len(evil), "0" * 64),
        ResultFile(2, "w.bin", len(blob), "1" * 64),
    )
    manifest = Manifest(JOB, files)
    held: Any = SimpleNamespace(
        job_id="j\x1b[2K", image="img", datastore="ds", manifest=manifest, held_since=rig.now
    )
    shown = render_show(rig.airlock, held, rig.now, "0/2")
    assert "\x1b" not in shown and "\x07" not in shown and "\u202e" not in shown
    assert "a\\x1b[1Ab.txt" in shown and "j\\x1b[2K" in shown
    assert "| ok\\x1b[2J\\x1b]0;pwned\\x07\\u202e" in shown
    assert "(300 more characters)" in shown  # a 500-character line cut at 200
    assert "CSV: 2 row(s); columns: site, count" in shown
    assert "(binary: not shown)" in shown and "\\x00" not in shown


def test_review_settings_follow_a_reload(tmp_path: Path) -> None:
    """Attack: the data-protection officer turns review on (or asks for two approvals, a
    shorter deadline, a new review program) and sends SIGHUP, which reports the keys
    applied; yet the next job's results leave unreviewed, or under the old rule,
    because the job system kept the start-up values. The airlock must read them anew."""
    from agent.config import parse_config
    from agent.jobs.setup import build_jobs
    from agent.reload import plan_reload
    from tests.helpers.env import valid_config

    raw = valid_config(tmp_path)
    holder = [parse_config(raw)]
    (tmp_path / "state").mkdir(mode=0o700)
    system = build_jobs(
        lambda: holder[0],
        runtime=None,  # type: ignore[arg-type]  # nothing here reaches the engine
        state_dir=tmp_path / "state",
        gpus=lambda: None,
        node_cpus=lambda: 1,
        gpu_support=lambda: False,
    )
    try:
        airlock = system.ctx.airlock
        assert airlock is not None and not airlock.required() and airlock.needed() == 1
        raw["results"] = {
            "review": "manual",
            "review_command": ["/bin/true"],
            "review_timeout_h": 2,
            "review_approvals": 2,
        }
        plan = plan_reload(holder[0], parse_config(raw))
        holder[0] = plan.config
        assert {f"results.{k}" for k in raw["results"]} <= set(plan.applied)
        assert airlock.required() and airlock.needed() == 2
        held: Any = SimpleNamespace(held_since=100.0)
        assert airlock.deadline(held) == 100.0 + 2 * 3600
        assert airlock._config().review_command == ["/bin/true"]  # read when a job is held
    finally:
        asyncio.run(system.close())


def test_the_janitor_forgets_ended_holds_and_deletes_results_that_will_not_be_sent(
    rig: Rig,
) -> None:
    """Attack (crash): the agent dies after a refusal was recorded but before the spool
    was deleted; the refused results then stay on disk for good. Once the job is no
    longer held, the janitor must delete them (released ones are kept for upload)."""
    rig.store.hold(JOB, rig.now)
    rig.store.vote(JOB, "0", "refuse", rig.now)
    rig.airlock.prune(lambda _job: True)  # still held (its end not yet recorded): kept
    assert rig.spool.load(JOB) is not None and rig.store.held_jobs() == [JOB]
    rig.airlock.prune(lambda _job: False)
    assert rig.spool.load(JOB) is None and rig.store.held_jobs() == []
