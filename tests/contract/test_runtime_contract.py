"""What the agent relies on from a :class:`~agent.runtime.base.Runtime`, on every backend.

Run against the fake (``agent.runtime.fake``) and the real Docker engine: the unit
tests of the job manager and runner trust the fake only as far as this suite proves it
behaves as Docker does. Each test names the agent code that depends on the behaviour.
"""

from __future__ import annotations

import pytest

from agent.errors import (
    ContainerExists,
    ContainerNotFound,
    ContainerRuntimeError,
    ContainerStartError,
    InvalidContainerSpec,
    WaitTimeout,
)
from agent.runtime.base import LABEL_JOB_ID
from tests.contract.conftest import Harness
from tests.helpers.env import seconds


def test_create_start_wait_gives_the_exit_code(runtime: Harness) -> None:
    """JobRunner ends a job exit_nonzero from ``wait``'s exit code; a created container
    is not running and has no exit code yet."""
    rt = runtime.runtime
    cid = runtime.create(runtime.job(exit_code=3))
    created = rt.inspect(cid)
    assert created is not None
    assert (created.status, created.running, created.exit_code) == ("created", False, None)
    rt.start(cid)
    state = rt.wait(cid, seconds(30))
    assert (state.status, state.running, state.exit_code, state.oom_killed) == (
        "exited",
        False,
        3,
        False,
    )
    assert state.finished_at is not None and state.started_at is not None


def test_outputs_are_in_the_output_dir_when_wait_returns(runtime: Harness) -> None:
    """The runner spools the output right after ``wait``: it must be complete then."""
    spec = runtime.job(outputs={"result.txt": b"done"})
    cid = runtime.create(spec)
    runtime.runtime.start(cid)
    assert runtime.runtime.wait(cid, seconds(30)).exit_code == 0
    assert (spec.output_dir / "result.txt").read_bytes() == b"done"


def test_wait_times_out_and_stop_ends_a_running_job_with_sigterm(runtime: Harness) -> None:
    """The runner's cancel and timeout paths: ``WaitTimeout`` leaves the job running,
    ``stop`` ends it (143, it heeds SIGTERM) and a second stop does nothing."""
    rt = runtime.runtime
    cid = runtime.create(runtime.job(forever=True))
    rt.start(cid)
    with pytest.raises(WaitTimeout):
        rt.wait(cid, seconds(1))
    state = rt.inspect(cid)
    assert state is not None and state.running is True
    rt.stop(cid, grace_s=seconds(10))
    state = rt.wait(cid, seconds(30))
    assert (state.running, state.exit_code) == (False, 143)
    rt.stop(cid, grace_s=seconds(10))


def test_oom_is_reported(runtime: Harness) -> None:
    """The runner ends a job oom_killed on ``oom_killed``, whatever its exit code."""
    cid = runtime.create(runtime.job(oom=True, memory_mib=32))
    runtime.runtime.start(cid)
    state = runtime.runtime.wait(cid, seconds(60))
    assert state.oom_killed is True
    assert state.exit_code != 0


def test_a_start_failure_raises_container_start_error(runtime: Harness) -> None:
    """The runner ends the job container_error on ContainerRuntimeError from start; the
    container is left created (never running) for the runner to remove."""
    spec = runtime.job()
    cid = runtime.create(spec)
    runtime.break_start(spec)
    with pytest.raises(ContainerStartError):
        runtime.runtime.start(cid)
    state = runtime.runtime.inspect(cid)
    assert state is not None and state.running is False and state.exit_code != 0


def test_list_jobs_after_a_restart_finds_running_and_exited_but_not_removed(
    runtime: Harness,
) -> None:
    """JobManager.recover re-adopts what a new runtime client lists by label."""
    rt = runtime.runtime
    running_spec, exited_spec, gone_spec = (
        runtime.job(forever=True),
        runtime.job(exit_code=5),
        runtime.job(),
    )
    running, exited, gone = (runtime.create(s) for s in (running_spec, exited_spec, gone_spec))
    rt.start(running)
    rt.start(exited)
    rt.wait(exited, seconds(30))
    rt.remove(gone)
    after = runtime.restart()
    found = {s.labels[LABEL_JOB_ID]: s for s in after.list_jobs(running_spec.node_id)}
    assert set(found) == {running_spec.job_id, exited_spec.job_id}
    assert found[running_spec.job_id].running is True
    assert found[running_spec.job_id].id == running
    assert (found[exited_spec.job_id].status, found[exited_spec.job_id].exit_code) == (
        "exited",
        5,
    )
    assert after.list_jobs("another-node") == []


def test_remove_is_idempotent_and_kills_a_running_job(runtime: Harness) -> None:
    """The runner's cleanup and recovery's reaper remove without checking first."""
    rt = runtime.runtime
    cid = runtime.create(runtime.job(forever=True))
    rt.start(cid)
    rt.remove(cid)
    assert rt.inspect(cid) is None
    rt.remove(cid)
    with pytest.raises(ContainerNotFound):
        rt.start(cid)
    with pytest.raises(ContainerNotFound):
        rt.wait(cid, seconds(5))


def test_inspect_of_a_missing_container_is_none(runtime: Harness) -> None:
    assert runtime.runtime.inspect("0" * 64) is None


def test_a_second_container_for_a_job_and_a_bad_spec_are_refused(runtime: Harness) -> None:
    """Recovery starts a never-started job again only after removing its container."""
    spec = runtime.job()
    runtime.create(spec)
    with pytest.raises(ContainerExists):
        runtime.create(spec)
    with pytest.raises(InvalidContainerSpec):
        runtime.create(runtime.job(user="0:0"))


def test_applied_isolation_names_no_host_path(runtime: Harness) -> None:
    """The audit ledger records it: no datastore location may leave the node."""
    spec = runtime.job()
    cid = runtime.create(spec)
    summary = runtime.runtime.applied_isolation(cid)
    assert {"image_id", "user", "networks", "mounts", "host_config"} <= set(summary)
    assert str(spec.data_dir) not in repr(summary)
    assert sorted(m["target"] for m in summary["mounts"]) == [
        "/opt/data",
        "/opt/model",
        "/opt/output",
    ]
    assert issubclass(ContainerStartError, ContainerRuntimeError)
