"""The bookkeeping that keeps the daemon's loops from dying or flooding the journal."""

from __future__ import annotations

import asyncio
import errno
import os

import pytest
import structlog

from agent import loops
from agent.jobs.store import StoreError
from agent.loops import LoopFailures, failure_kind


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _emfile() -> OSError:
    return OSError(errno.EMFILE, os.strerror(errno.EMFILE))


def test_failure_kinds_tell_errnos_apart() -> None:
    assert failure_kind(_emfile()) == "OSError[EMFILE]"
    assert failure_kind(OSError(errno.ENOSPC, "full")) == "OSError[ENOSPC]"
    assert failure_kind(StoreError("locked")) == "StoreError"
    assert failure_kind(OSError("no errno")) == "OSError"


def test_a_failure_repeated_every_pass_is_logged_once_per_window() -> None:
    """Attack: a local user keeps the agent out of descriptors, so the sampler fails on
    every pass (every 10 s); one log line each would let them fill the journal."""
    clock = _Clock()
    failures = LoopFailures(repeat_log_s=600.0, clock=clock)
    with structlog.testing.capture_logs() as logged:
        for _ in range(59):  # ten minutes of passes, 10 s apart
            failures.failed("host-sampler", _emfile())
            clock.now += 10.0
        failures.failed("host-sampler", StoreError("another kind"))  # a new kind: logged
        clock.now += 10.0
        failures.failed("host-sampler", _emfile())  # the window has passed: logged, counted
        failures.succeeded("host-sampler")
        failures.succeeded("host-sampler")  # nothing more to say
    lines = [(e["event"], e.get("kind"), e.get("repeats_not_logged")) for e in logged]
    assert lines == [
        ("loop_failed", "OSError[EMFILE]", 0),
        ("loop_failed", "StoreError", 0),
        ("loop_failed", "OSError[EMFILE]", 58),
        ("loop_recovered", None, None),
    ]
    assert logged[-1]["failures"] == 61
    assert failures.failing() == {}


def test_loops_are_counted_apart() -> None:
    failures = LoopFailures(clock=_Clock())
    with structlog.testing.capture_logs() as logged:
        failures.failed("gpu-sampler", _emfile())
        failures.failed("host-sampler", _emfile())
    assert [e["loop"] for e in logged] == ["gpu-sampler", "host-sampler"]
    assert failures.failing() == {"gpu-sampler": 1, "host-sampler": 1}


def test_a_job_end_is_written_once_the_disk_takes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Review finding: on a full disk the job store's error escaped a job's end, so the
    terminal state was never recorded nor sent. ``until_done`` retries the write, with
    a growing pause, until the disk takes it; a bug (not a disk error) still raises."""
    monkeypatch.setattr(loops, "RETRY_FIRST_S", 0.001)
    tries: list[int] = []

    def write() -> None:
        tries.append(1)
        if len(tries) < 4:
            raise StoreError("database or disk is full")

    with structlog.testing.capture_logs() as logged:
        asyncio.run(loops.until_done(write, "job_end_not_recorded", job_id="j-1"))
    assert len(tries) == 4
    assert [e["retry_in_s"] for e in logged] == [0.001, 0.002, 0.004]
    assert all(e["job_id"] == "j-1" for e in logged)

    def buggy() -> None:
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        asyncio.run(loops.until_done(buggy, "job_end_not_recorded"))
