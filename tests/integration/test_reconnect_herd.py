"""50 agents whose control plane is down spread their reconnects over the backoff window.

The spread is judged on the delays the agents chose (``backoff_s`` of the state each
publishes when a dial fails), not on the intervals between their dials: on a loaded
machine the event loop of 50 connections runs late, which lengthens every interval and
piles them up at the end of the window although the choices were spread. That each
agent then waited its chosen delay is checked too; lateness only lengthens a wait.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

from agent.config import parse_config
from agent.connection import Connection
from agent.health.facts import ControlPlaneFacts
from agent.protocol.session import Stats
from tests.helpers.env import free_port, seconds, valid_config
from tests.helpers.handlers import QuietHandler

AGENTS = 50
INITIAL_S = 1.0


def test_first_reconnects_spread_over_the_window(tmp_path: Path) -> None:
    raw = valid_config(tmp_path)
    down = free_port()  # nothing listens here: every dial is refused at once
    raw["control_plane"]["url"] = f"ws://127.0.0.1:{down}/agent/v1"
    raw["control_plane"]["reconnect"] = {"initial_s": INITIAL_S, "max_s": 8}
    config = parse_config(raw)
    assert config.control_plane is not None
    cp = config.control_plane
    attempts: dict[int, list[float]] = {i: [] for i in range(AGENTS)}
    # (when, backoff_s) of each failed dial's state, in order.
    backoffs: dict[int, list[tuple[float, float]]] = {i: [] for i in range(AGENTS)}

    def recorder(i: int) -> Any:
        def publish(facts: ControlPlaneFacts) -> None:
            if facts.state == "connecting":
                attempts[i].append(time.monotonic())
            elif facts.backoff_s is not None and len(backoffs[i]) < len(attempts[i]):
                backoffs[i].append((time.monotonic(), facts.backoff_s))

        return publish

    async def main() -> None:
        connections = [
            Connection(
                cp,
                hello=lambda jobs: {"type": "hello"},
                telemetry=lambda jobs: {},
                handler=QuietHandler(),
                publish=recorder(i),
                stats=Stats(),
                user_agent="test",
            )
            for i in range(AGENTS)
        ]
        tasks = [asyncio.create_task(c.run()) for c in connections]
        deadline = time.monotonic() + seconds(INITIAL_S * 3 + 2)
        # Polls what the connections record through their publish callbacks.
        while time.monotonic() < deadline and any(len(a) < 2 for a in attempts.values()):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())
    assert all(len(a) >= 2 for a in attempts.values()), "every agent should have retried"
    assert all(b for b in backoffs.values()), "every failed dial should publish its delay"
    chosen = [backoffs[i][0][1] for i in range(AGENTS)]
    for i in range(AGENTS):
        failed_at, delay = backoffs[i][0]
        # asyncio may wake a timer up to its clock resolution early: 10 ms of slack.
        assert attempts[i][1] - failed_at >= delay - 0.01, f"agent {i} retried early"
    # Full jitter: the first retry waits uniformly in [0, initial_s). With 50 agents a
    # herd would put them all at one instant; spread means they cover the window.
    assert all(0 <= d < INITIAL_S for d in chosen), chosen
    assert max(chosen) - min(chosen) > 0.6 * INITIAL_S
    assert statistics.pstdev(chosen) > 0.15 * INITIAL_S
    buckets = [0] * 10
    for delay in chosen:
        buckets[int(delay / INITIAL_S * 10)] += 1
    # 5 a tenth on average; more than 20 in one tenth has odds of about 1e-9 when the
    # choices are uniform, and a herd would put all 50 there.
    assert max(buckets) <= 20, f"too many agents retried together: {buckets}"
