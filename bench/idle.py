"""Idle footprint (docs/benchmarks.md: RSS ≤ 48 MiB, CPU ≤ 0.5 % of a core over 60 s).

Runs the real daemon (no control plane, one datastore) and, in the same run, a trivial
Python process that only wakes twice a second, and reports both: on a VM the kernel's
tick-based CPU accounting charges even that trivial process, so the agent's own cost is
the difference. The trivial process's RSS is the floor any Python daemon pays.

Run: ``.venv/bin/python bench/idle.py [--seconds 60] [--quick] [--json PATH]``
(``--quick``: 2 s settle, 5 s window).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._report import add_report_args, metric, write_json
from tests.helpers.env import free_port
from tests.helpers.proc import running_agent

TRIVIAL = """
import asyncio, selectors, threading
def poll():
    s = selectors.DefaultSelector()
    while True:
        s.select(1.0)
threading.Thread(target=poll, daemon=True).start()
async def main():
    while True:
        await asyncio.sleep(1)
asyncio.run(main())
"""


def cpu_total(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=60, help="the measuring window")
    parser.add_argument("--settle", type=float, default=15, help="seconds past startup")
    add_report_args(parser)
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.settle = 5, 2
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        data = tmp_path / "data"
        data.mkdir()
        config = tmp_path / "config.yaml"
        # A free port, not a fixed one: tests and other benches may hold any fixed port.
        port = free_port()
        config.write_text(
            f"state_dir: {tmp}/state\nhealth: {{listen: '127.0.0.1:{port}'}}\n"
            f"datastores: [{{name: a, path: {data}}}]\nlogging: {{level: warning}}\n"
        )
        trivial = subprocess.Popen([sys.executable, "-c", TRIVIAL])
        try:
            with running_agent(config, port, tmp_path) as agent:
                time.sleep(args.settle)
                agent_proc, trivial_proc = (
                    psutil.Process(agent.proc.pid),
                    psutil.Process(trivial.pid),
                )
                agent_before, base_before = cpu_total(agent_proc), cpu_total(trivial_proc)
                time.sleep(args.seconds)
                agent_cpu = cpu_total(agent_proc) - agent_before
                base_cpu = cpu_total(trivial_proc) - base_before
                # RSS at the end of the window: growth while idle counts against the budget.
                rss = agent_proc.memory_info().rss / 2**20
                base_rss = trivial_proc.memory_info().rss / 2**20
        finally:
            trivial.terminate()
            trivial.wait(timeout=10)
    pct = 100 * agent_cpu / args.seconds
    base_pct = 100 * base_cpu / args.seconds
    print(f"idle agent over {args.seconds:.0f} s on this machine ({os.cpu_count()} CPUs):")
    print(f"  RSS                          {rss:6.1f} MiB (budget 48)")
    print(f"  trivial process RSS          {base_rss:6.1f} MiB (same run)")
    print(f"  CPU                          {pct:6.2f} % of a core")
    print(f"  trivial 2-wakeup/s baseline  {base_pct:6.2f} % of a core (same run)")
    print(f"  agent minus baseline         {pct - base_pct:6.2f} % (budget 0.5)")
    write_json(
        args.json,
        [
            metric("idle.rss", rss, base_rss, "value <= 48", "MiB"),
            metric("idle.cpu", pct, base_pct, "value-baseline <= 0.5", "% of a core"),
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
