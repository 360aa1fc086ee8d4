"""Jobs (PROTOCOL.md §4) on the reference CP: the jobs API, auto_ack, and the §4 checks."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from agent.controlplane import TERMINAL_STATES, ConditionTimeout, ThreadedControlPlane
from tests.controlplane.rawagent import RawAgent, job_state, raw_agent
from tests.controlplane.wire import NODE, TOKEN, cp_with, run
from tests.helpers.env import seconds

IMAGE = "registry.example/provider/sepsis:1.4"
RUN = ("accepted", "preparing", "running", "uploading")
ASSIGN_AGAIN: dict[str, Any] = {}  # in a list of messages: the CP sends job.assign again


async def accept(agent: RawAgent, job_id: str) -> None:
    assign = await agent.expect("job.assign")
    assert assign["job_id"] == job_id
    await agent.send({"type": "job.accepted", "job_id": job_id})


async def send_states(agent: RawAgent, job_id: str, *states: str, **end: Any) -> None:
    for state in states:
        fields = end if state in TERMINAL_STATES else {}
        await agent.send(job_state(job_id, state, **fields))


def test_assign_cancel_and_ack_send_the_messages_of_section_4() -> None:
    async def main() -> None:
        async with cp_with() as cp, raw_agent(cp) as agent:
            await cp.assign(
                NODE,
                "j-1",
                IMAGE,
                "vitals",
                image={"digest": "sha256:" + "a" * 64},
                command=["python", "/opt/model/predict.py"],
                env={"BATCH_SIZE": "64"},
                timeout_s=3600,
            )
            assert await agent.expect("job.assign") == {
                "type": "job.assign",
                "job_id": "j-1",
                "image": {"ref": IMAGE, "digest": "sha256:" + "a" * 64},
                "datastore": "vitals",
                "command": ["python", "/opt/model/predict.py"],
                "env": {"BATCH_SIZE": "64"},
                "timeout_s": 3600,
            }
            await cp.cancel(NODE, "j-1")
            assert await agent.expect("job.cancel") == {"type": "job.cancel", "job_id": "j-1"}
            await cp.ack(NODE, "j-1")
            assert await agent.expect("job.ack") == {"type": "job.ack", "job_id": "j-1"}
            track = cp.nodes()[NODE].jobs["j-1"]
            assert (track.assigns, track.cancels, track.acks) == (1, 1, 1)

    run(main())


def test_a_job_run_in_order_has_no_violations_and_can_be_waited_for() -> None:
    async def main() -> None:
        async with cp_with() as cp, raw_agent(cp) as agent:
            await cp.assign(NODE, "j-1", IMAGE, "vitals")
            await accept(agent, "j-1")
            await send_states(agent, "j-1", "accepted", "waiting", "preparing", "running")
            running = await cp.wait_for_job(NODE, "j-1", {"running"}, seconds(5))
            assert running["state"] == "running"
            with pytest.raises(ConditionTimeout):
                await cp.wait_for_job(NODE, "j-1", timeout=seconds(0.1))
            await send_states(agent, "j-1", "uploading")
            assert (await agent.upload("j-1", [("a", b"1")]))["type"] == "result.accepted"
            await send_states(agent, "j-1", "succeeded", reason="completed", exit_code=0)
            end = await cp.wait_for_job(NODE, "j-1", timeout=seconds(5))
            assert (end["state"], end["reason"], end["exit_code"]) == ("succeeded", "completed", 0)
            states = [m["state"] for m in cp.job_states(NODE, "j-1")]
            assert states == [
                "accepted",
                "waiting",
                "preparing",
                "running",
                "uploading",
                "succeeded",
            ]
            assert await agent.quiet("job.ack")  # auto_ack is off by default
            assert cp.nodes()[NODE].violations == []

    run(main())


def test_auto_ack_acks_every_terminal_state_and_only_those() -> None:
    async def main() -> None:
        async with cp_with(auto_ack=True) as cp:
            async with raw_agent(cp) as agent:
                await cp.assign(NODE, "j-1", IMAGE, "vitals")
                await accept(agent, "j-1")
                await send_states(agent, "j-1", "accepted", "preparing")
                assert await agent.quiet("job.ack")
                await send_states(agent, "j-1", "failed", reason="image_unavailable")
                assert await agent.expect("job.ack") == {"type": "job.ack", "job_id": "j-1"}
            # The ack was lost with the session: the agent says it again, and is acked again.
            jobs = [{"job_id": "j-1", "state": "failed"}]
            async with raw_agent(cp, jobs=jobs) as agent:
                await send_states(agent, "j-1", "failed", reason="image_unavailable")
                assert (await agent.expect("job.ack"))["job_id"] == "j-1"
            assert cp.nodes()[NODE].jobs["j-1"].acks == 2
            assert cp.nodes()[NODE].violations == []

    run(main())


@pytest.mark.parametrize(
    ("states", "violation"),
    [
        (("accepted", "running"), "running after accepted skips a state"),
        (("accepted", "preparing", "running", "preparing"), "preparing after running"),
        (("preparing",), "first state is preparing, expected accepted"),
        (("accepted", "waiting", "running"), "running after waiting skips a state"),
    ],
)
def test_states_out_of_order_are_violations(states: tuple[str, ...], violation: str) -> None:
    async def main() -> None:
        async with cp_with() as cp, raw_agent(cp) as agent:
            await cp.assign(NODE, "j-1", IMAGE, "vitals")
            await accept(agent, "j-1")
            await send_states(agent, "j-1", *states)
            await cp.wait_for_job(NODE, "j-1", {states[-1]}, seconds(5))
            await agent.barrier(cp)
            assert cp.nodes()[NODE].violations == [f"job.state: j-1: {violation}"]

    run(main())


@pytest.mark.parametrize(
    ("messages", "violation"),
    [
        (
            [
                job_state("j-1", "accepted"),
                job_state("j-1", "failed", reason="oom_killed", exit_code=137),
                job_state("j-1", "cancelled", reason="cancel_requested"),
            ],
            "job.state: j-1: cancelled after the job ended failed",
        ),
        (
            [
                job_state("j-1", "accepted"),
                job_state("j-1", "failed", reason="oom_killed", exit_code=137),
                job_state("j-1", "failed", reason="oom_killed", exit_code=137),
            ],
            "job.state: j-1: terminal state failed repeated in one session",
        ),
        (
            [job_state("j-1", "accepted"), job_state("j-1", "succeeded", reason="completed")],
            "job.state: j-1: succeeded with exit_code None, expected 0",
        ),
        (
            [job_state("j-1", "accepted"), job_state("j-1", "failed", reason="exit_nonzero")],
            "job.state: j-1: exit_nonzero with exit_code None",
        ),
        (
            [job_state("j-1", "failed", reason="container_error", exit_code=1)],
            "job.state: j-1: exit_code 1 although the container never ran (container_error)",
        ),
        (
            [job_state("j-9", "accepted")],
            "job.state: j-9: job.state for a job this CP never assigned",
        ),
        (
            [{"type": "job.accepted", "job_id": "j-1"}],
            "job.accepted: j-1: job.accepted without a job.assign to answer",
        ),
        (
            [ASSIGN_AGAIN, {"type": "job.rejected", "job_id": "j-1", "code": "no_capacity"}],
            "job.rejected: j-1: job.rejected no_capacity for a job it had accepted",
        ),
        (
            [
                job_state("j-1", "accepted"),
                job_state("j-1", "failed", reason="oom_killed", exit_code=137),
                ASSIGN_AGAIN,
                {"type": "job.accepted", "job_id": "j-1"},
            ],
            "job.accepted: j-1: job.accepted for a job that ended (expected duplicate_job)",
        ),
    ],
    ids=[
        "two-ends",
        "end-twice",
        "succeeded-exit",
        "nonzero-exit",
        "never-ran",
        "unassigned",
        "answered-twice",
        "rejected-after-accept",
        "accepted-after-end",
    ],
)
def test_section_4_violations_are_recorded(messages: list[dict[str, Any]], violation: str) -> None:
    async def main() -> None:
        async with cp_with() as cp, raw_agent(cp) as agent:
            await cp.assign(NODE, "j-1", IMAGE, "vitals")
            await accept(agent, "j-1")
            for message in messages:
                if message is ASSIGN_AGAIN:
                    await agent.barrier(cp)
                    await cp.assign(NODE, "j-1", IMAGE, "vitals")
                else:
                    await agent.send(message)
            await agent.barrier(cp)
            violations = cp.nodes()[NODE].violations
            assert violation in violations, violations
            # succeeded without accepted results is one more; every other case is alone.
            assert len(violations) == 1 + (violation.endswith("expected 0")), violations

    run(main())


def test_after_a_reconnect_a_job_may_have_moved_on_but_not_back() -> None:
    async def main() -> None:
        async with cp_with() as cp:
            async with raw_agent(cp) as agent:
                await cp.assign(NODE, "j-1", IMAGE, "vitals")
                await accept(agent, "j-1")
                await send_states(agent, "j-1", "accepted", "preparing")
            jobs = [{"job_id": "j-1", "state": "uploading"}]
            async with raw_agent(cp, jobs=jobs) as agent:
                await send_states(agent, "j-1", "uploading", "failed", reason="no_space")
                await cp.wait_for_job(NODE, "j-1", timeout=seconds(5))
            assert cp.nodes()[NODE].violations == []
            async with raw_agent(cp, jobs=[{"job_id": "j-1", "state": "failed"}]) as agent:
                await send_states(agent, "j-1", "failed", reason="no_space")  # unchanged: fine
                await send_states(agent, "j-1", "running")
                await cp.wait_for_job(NODE, "j-1", {"running"}, seconds(5))
            assert cp.nodes()[NODE].violations == [
                "job.state: j-1: running after the job ended failed"
            ]

    run(main())


def test_jobs_listed_in_hello_may_report_without_an_assignment_here() -> None:
    async def main() -> None:
        async with cp_with() as cp:
            jobs = [{"job_id": "j-old", "state": "running"}]
            async with raw_agent(cp, jobs=jobs) as agent:
                await send_states(agent, "j-old", "running", "uploading")
                await send_states(agent, "j-old", "succeeded", reason="completed", exit_code=0)
                await cp.wait_for_job(NODE, "j-old", timeout=seconds(5))
            assert cp.nodes()[NODE].violations == []

    run(main())


def test_threaded_jobs_and_results_api() -> None:
    with ThreadedControlPlane({TOKEN: "*"}, auto_ack=True) as cp:
        cp.results_fault("j-1", reject_file_once=0)

        async def agent_side() -> None:
            async with raw_agent(cp.cp) as agent:
                await accept(agent, "j-1")
                await send_states(agent, "j-1", "accepted", "preparing", "running", "uploading")
                assert (await agent.upload("j-1", [("a", b"abc")]))["type"] == "result.rejected"
                await agent.send_file("j-1", 0, b"abc")
                await agent.send({"type": "result.end", "job_id": "j-1"})
                assert (await agent.verdict())["type"] == "result.accepted"
                await send_states(agent, "j-1", "succeeded", reason="completed", exit_code=0)
                await agent.expect("job.ack")

        def assign_when_connected() -> None:
            cp.wait_for_node(NODE, seconds(5))
            cp.assign(NODE, "j-1", IMAGE, "vitals", resources={"cpus": 2})

        thread = threading.Thread(target=assign_when_connected)
        thread.start()
        asyncio.run(agent_side())
        thread.join()
        state = cp.wait_for_results(NODE, "j-1", seconds(5))
        assert state.rejected == ((0, "checksum_mismatch"),) and state.accepted == 1
        assert cp.results_state(NODE, "j-1") == state
        assert {p: f.read_bytes() for p, f in cp.result_files(NODE, "j-1").items()} == {"a": b"abc"}
        assert cp.wait_for_job(NODE, "j-1", timeout=seconds(5))["state"] == "succeeded"
        assert [m["state"] for m in cp.job_states(NODE, "j-1")][-1] == "succeeded"
        node = cp.node(NODE)
        assert node is not None and node.violations == []
