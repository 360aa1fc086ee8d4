"""The job store (real SQLite files in tmp) and the job state machine.

The store is what a restart rebuilds the node from; the state machine is what keeps
a control plane from hearing a job go backwards or end twice.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.jobs.model import (
    ORDER,
    TERMINAL,
    TERMINAL_REASON,
    State,
    TransitionError,
    check_transition,
)
from agent.jobs.store import JobRecord, JobStore, StoreError


def record(job_id: str, created_at: float = 1.0) -> JobRecord:
    assignment = {"job_id": job_id, "image": {"ref": "r/i:1"}, "datastore": "vitals"}
    return JobRecord(job_id, State.ACCEPTED, assignment, created_at, created_at)


def test_a_record_survives_a_restart_whole(tmp_path: Path) -> None:
    """A restart that loses a job's container, GPUs or exit code (re-adoption then fails)."""
    store = JobStore(tmp_path / "jobs.db")
    job = record("j-1")
    store.insert(job)
    job.state, job.reason, job.exit_code = State.FAILED, "exit_nonzero", 3
    job.container_id, job.gpu_uuids, job.ended_at = "c" * 64, ("GPU-a", "GPU-b"), 9.0
    store.update(job)
    store.close()
    reopened = JobStore(tmp_path / "jobs.db")
    assert reopened.get("j-1") == job
    assert reopened.get("j-404") is None
    assert oct((tmp_path / "jobs.db").stat().st_mode & 0o777) == "0o600"


def test_unacknowledged_lists_oldest_first_and_drops_acked_jobs(tmp_path: Path) -> None:
    """An acknowledged job re-announced in hello.jobs after every restart, or jobs out of order."""
    store = JobStore(tmp_path / "jobs.db")
    for job_id, at in (("j-b", 2.0), ("j-a", 3.0), ("j-c", 1.0)):
        store.insert(record(job_id, at))
    acked = record("j-b", 2.0)
    acked.state, acked.reason, acked.ended_at, acked.acked_at = State.FAILED, "agent_error", 2, 4
    store.update(acked)
    assert [r.job_id for r in store.unacknowledged()] == ["j-c", "j-a"]


def test_a_job_inserted_twice_is_refused(tmp_path: Path) -> None:
    """A resent job.assign recorded as a second job with the same id."""
    store = JobStore(tmp_path / "jobs.db")
    store.insert(record("j-1"))
    with pytest.raises(StoreError):
        store.insert(record("j-1"))


def test_forget_old_keeps_unacknowledged_and_recent_jobs(tmp_path: Path) -> None:
    """An unacknowledged end (the control plane never heard it) forgotten by the cleanup."""
    store = JobStore(tmp_path / "jobs.db")
    for job_id in ("old-acked", "old-unacked", "new-acked"):
        store.insert(record(job_id))
    for job_id, ended, acked in (
        ("old-acked", 1, 2),
        ("old-unacked", 1, None),
        ("new-acked", 99 * 86400, 99 * 86400),
    ):
        r = record(job_id)
        r.state, r.reason, r.ended_at, r.acked_at = State.FAILED, "agent_error", ended, acked
        store.update(r)
    assert store.forget_old(now=100 * 86400) == 1
    assert store.get("old-acked") is None
    assert store.get("old-unacked") is not None and store.get("new-acked") is not None


def test_a_store_that_cannot_be_written_says_so(tmp_path: Path) -> None:
    """A read-only or broken store reported healthy while every job end is lost."""
    store = JobStore(tmp_path / "jobs.db")
    assert store.writable() is True
    store.close()
    (tmp_path / "jobs.db").unlink()
    (tmp_path / "jobs.db").mkdir()
    with pytest.raises(StoreError):
        JobStore(tmp_path / "jobs.db")


def test_states_move_forward_only_and_waiting_may_be_skipped() -> None:
    """A job.state that repeats or skips a step, which the control plane rejects."""
    for here, state in enumerate(ORDER):
        for there, new in enumerate(ORDER):
            skips = {(State.ACCEPTED, State.PREPARING), (State.RUNNING, State.UPLOADING)}
            allowed = there == here + 1 or (state, new) in skips
            if allowed:
                check_transition(state, new)
            else:
                with pytest.raises(TransitionError):
                    check_transition(state, new)


def test_every_state_can_end_but_only_once_and_only_with_its_reasons() -> None:
    """A job that ends twice, or ends with a reason the protocol does not define."""
    for state in ORDER:
        for end, reasons in TERMINAL_REASON.items():
            for reason in reasons:
                check_transition(state, end, reason)
            with pytest.raises(TransitionError):
                check_transition(state, end, "made_up")
            with pytest.raises(TransitionError):
                check_transition(state, end, None)
        with pytest.raises(TransitionError):
            check_transition(
                state, State.RUNNING if state is not State.ACCEPTED else State.WAITING, "x"
            )
    for ended in TERMINAL:
        for new in State:
            with pytest.raises(TransitionError):
                check_transition(ended, new, "completed")
