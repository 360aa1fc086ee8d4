"""50 agents whose control plane is down spread their reconnects over the backoff window."""

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

    def recorder(i: int) -> Any:
        def publish(facts: ControlPlaneFacts) -> None:
            if facts.state == "connecting":
                attempts[i].append(time.monotonic())

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
    first_retry = [a[1] - a[0] for a in attempts.values()]
    # Full jitter: the first retry waits uniformly in [0, initial_s). With 50 agents a
    # herd would put them all at one instant; spread means they cover the window.
    assert max(first_retry) < INITIAL_S + seconds(0.5)
    assert max(first_retry) - min(first_retry) > 0.6 * INITIAL_S
    assert statistics.pstdev(first_retry) > 0.15 * INITIAL_S
    buckets = [0] * 10
    for delay in first_retry:
        buckets[min(int(delay / INITIAL_S * 10), 9)] += 1
    assert max(buckets) <= 15, f"too many agents retried together: {buckets}"
