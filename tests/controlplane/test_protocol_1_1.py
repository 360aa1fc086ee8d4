"""The reference CP speaks PROTOCOL.md 1.1: it refuses to send a job.assign that breaks
1.1's id pattern or caps, and it accepts 1.1's new state, reasons and rejection code."""

from __future__ import annotations

from typing import Any

import pytest

from agent.controlplane import BadAssignment, ThreadedControlPlane
from tests.controlplane.rawagent import job_state, raw_agent
from tests.controlplane.test_jobs import IMAGE, accept, send_states
from tests.controlplane.wire import NODE, TOKEN, cp_with, run

KIB = 1024


@pytest.mark.parametrize(
    ("job_id", "fields", "words"),
    [
        ("..", {}, "job_id must match"),
        (".", {}, "job_id must match"),
        ("-x", {}, "job_id must match"),
        ("_x", {}, "job_id must match"),
        ("j-1", {"resources": {"cpus": 1e-10}}, "resources.cpus must be at least 0.01"),
        ("j-1", {"command": ["a"] * 257}, "command has 257 items, at most 256"),
        ("j-1", {"command": ["x" * (64 * KIB + 1)]}, f"more than {64 * KIB} bytes"),
        ("j-1", {"env": {f"V{i}": "" for i in range(257)}}, "env has 257 entries"),
        ("j-1", {"env": {"V": "x" * (64 * KIB)}}, f"more than {64 * KIB} bytes"),
        ("j-1", {"env": {"A-B": "v"}}, "env names must match"),
        ("j-1", {"env": {"A": "\0"}}, "NUL"),
        ("j-1", {"gpus": {"count": 1, "types": ["T"] * 17}}, "gpus.types has 17 names"),
        ("j-1", {"gpus": {"count": 1, "types": ["T" * 257]}}, "at most 256 characters"),
        ("j-1", {"pad": "p" * (256 * KIB)}, f"at most {256 * KIB}"),
    ],
)
def test_the_api_refuses_a_job_that_breaks_1_1_and_sends_nothing(
    job_id: str, fields: dict[str, Any], words: str
) -> None:
    """A caller about to assign a job the agent must refuse (a CPU limit of none, a
    path-like id, a huge spec) learns it at once, by name; nothing reaches the node."""

    async def main() -> None:
        async with cp_with() as cp, raw_agent(cp) as agent:
            with pytest.raises(BadAssignment) as info:
                await cp.assign(NODE, job_id, IMAGE, "vitals", **fields)
            assert any(words in p for p in info.value.problems), info.value.problems
            assert "xxxxxxxx" not in str(info.value)
            assert await agent.quiet("job.assign")
            assert cp.nodes()[NODE].jobs == {}

    run(main())


def test_the_api_sends_a_job_at_every_limit() -> None:
    at_limits: dict[str, Any] = {
        "command": ["a"] * 255 + ["x" * (60 * KIB)],
        "env": {f"V{i:03d}": "" for i in range(255)} | {"_Z" + "z" * 125: "v"},
        "gpus": {"count": 1, "types": ["T" * 256] * 16},
        "resources": {"cpus": 0.01},
    }

    async def main() -> None:
        async with cp_with() as cp, raw_agent(cp) as agent:
            await cp.assign(NODE, "A" * 128, IMAGE, "vitals", **at_limits)
            sent = await agent.expect("job.assign")
            assert sent["job_id"] == "A" * 128 and sent["resources"] == {"cpus": 0.01}

    run(main())


def test_the_threaded_api_refuses_too() -> None:
    with ThreadedControlPlane(tokens={TOKEN: NODE}) as cp, pytest.raises(BadAssignment):
        cp.assign(NODE, "..", IMAGE, "vitals")


def test_held_new_reasons_and_runtime_unavailable_are_no_violations() -> None:
    """1.1's additions from an agent must not be recorded as breaking the protocol."""

    async def main() -> None:
        async with cp_with() as cp, raw_agent(cp) as agent:
            for job_id in ("j-1", "j-2", "j-3", "j-4"):
                await cp.assign(NODE, job_id, IMAGE, "vitals")
            await accept(agent, "j-1")
            await send_states(agent, "j-1", "accepted", "preparing", "running", "held")
            await send_states(agent, "j-1", "failed", reason="result_refused", exit_code=0)
            await accept(agent, "j-2")
            await send_states(agent, "j-2", "accepted", "preparing", "running", "held")
            await send_states(agent, "j-2", "failed", reason="review_timeout", exit_code=0)
            await accept(agent, "j-3")
            await send_states(agent, "j-3", "accepted", "preparing", "running")
            await send_states(agent, "j-3", "cancelled", reason="cancelled_on_node")
            await agent.expect("job.assign")
            await agent.send(
                {"type": "job.rejected", "job_id": "j-4", "code": "runtime_unavailable"}
            )
            await agent.barrier(cp)
            assert cp.nodes()[NODE].violations == []

    run(main())


@pytest.mark.parametrize("reason", ["result_invalid", "result_too_large", "result_refused"])
def test_a_failure_after_the_container_exited_needs_its_exit_code(reason: str) -> None:
    """1.1: every job whose container exited reports the code it exited with."""

    async def main() -> None:
        async with cp_with() as cp, raw_agent(cp) as agent:
            await cp.assign(NODE, "j-1", IMAGE, "vitals")
            await accept(agent, "j-1")
            await send_states(agent, "j-1", "accepted", "preparing", "running")
            await agent.send(job_state("j-1", "failed", reason=reason))
            await agent.barrier(cp)
            assert cp.nodes()[NODE].violations == [
                f"job.state: j-1: {reason} without the exit_code of the container that ran"
            ]

    run(main())
