"""Idle footprint (DESIGN.md §6: RSS ≤ 60 MiB, CPU ≤ 0.5 % of a core over 60 s).

Runs the real daemon (no control plane, one datastore) and, in the same run, a trivial
Python process that only wakes twice a second, and reports both: on a VM the kernel's
tick-based CPU accounting charges even that trivial process, so the agent's own cost is
the difference.

Run: ``.venv/bin/python bench/idle.py [--seconds 60]``.
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


def cpu_seconds(proc: psutil.Process, seconds: float) -> float:
    before = proc.cpu_times()
    time.sleep(seconds)
    after = proc.cpu_times()
    return (after.user + after.system) - (before.user + before.system)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=60)
    args = parser.parse_args()
    exe = Path(sys.executable).parent / "cloudbender-agent"
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        config = Path(tmp) / "config.yaml"
        config.write_text(
            f"state_dir: {tmp}/state\nhealth: {{listen: '127.0.0.1:18799'}}\n"
            f"datastores: [{{name: a, path: {data}}}]\nlogging: {{level: warning}}\n"
        )
        agent = subprocess.Popen([exe, "run", "--config", str(config)])
        trivial = subprocess.Popen([sys.executable, "-c", TRIVIAL])
        try:
            time.sleep(15)  # past startup
            agent_proc, trivial_proc = psutil.Process(agent.pid), psutil.Process(trivial.pid)
            rss = agent_proc.memory_info().rss / 2**20
            base_before = trivial_proc.cpu_times()
            agent_cpu = cpu_seconds(agent_proc, args.seconds)
            base_after = trivial_proc.cpu_times()
            base_cpu = (base_after.user + base_after.system) - (
                base_before.user + base_before.system
            )
        finally:
            for proc in (agent, trivial):
                proc.terminate()
                proc.wait(timeout=10)
    pct = 100 * agent_cpu / args.seconds
    base_pct = 100 * base_cpu / args.seconds
    print(f"idle agent over {args.seconds:.0f} s on this machine ({os.cpu_count()} CPUs):")
    print(f"  RSS                          {rss:6.1f} MiB (budget 60)")
    print(f"  CPU                          {pct:6.2f} % of a core")
    print(f"  trivial 2-wakeup/s baseline  {base_pct:6.2f} % of a core (same run)")
    print(f"  agent minus baseline         {pct - base_pct:6.2f} % (budget 0.5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
