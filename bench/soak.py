"""Soak: many small jobs while the control plane restarts and the agent is SIGKILLed.

Each job writes a few random result files and its own sha256 list of them
(``sums.txt``). While jobs run, spool and stream, faults are injected at seeded random
moments: the reference control plane is stopped and started again on its port (its
job records and results directory survive, as a real CP's database would), and the
agent is killed with SIGKILL, either at a random moment or, for every other kill, at a
crash point inside the result path (agent/faults.py: while results are spooled or
while they stream), then started again. At the end it prints:

- jobs assigned, and ended by state and reason;
- lost: a job whose container exited 0 but whose accepted results are not exactly its
  files (the names in its own list, byte-identical);
- duplicated: a job whose container was started twice (two ``container_started`` in
  the audit ledger), or whose results were accepted under two different manifests;
- corrupted: an accepted file whose sha256 differs from the job's own list;
- containers left after their job ended, outputs left on disk;
- the control plane's protocol violations, and ``audit --verify``.

Bounded in count and time, seeded, loopback and the local engine only. Exit status 0
only when nothing was lost, duplicated or corrupted, nothing was left behind and the
ledger verifies.

Run: ``make soak`` (40 jobs, 8 control-plane restarts, 5 agent kills), or
``.venv/bin/python bench/soak.py --jobs N --cp-restarts N --agent-kills N --seed N``.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import docker

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.controlplane.errors import NodeNotConnected
from agent.faults import ENV
from tests.helpers.jobnode import TERMINAL, JobNode, job_node

CRASH_POINTS = ["spool.file_copied:{n}", "spool.files_copied", "upload.chunk_sent:{n}"]


def job_script(rng: random.Random) -> str:
    """A job that writes 1-5 random files (up to 2 MiB) and its own sha256 list."""
    lines = ["cd /opt/output", "mkdir -p sub"]
    names = []
    for i in range(rng.randint(1, 5)):
        name = f"sub/f{i}.bin" if rng.random() < 0.4 else f"f{i}.bin"
        kib = rng.choice([0, 1, 3, 64, 700, 2048])
        lines.append(f"dd if=/dev/urandom of={name} bs=1024 count={kib} 2>/dev/null")
        names.append(name)
    lines.append(f"sleep {rng.choice([0, 0, 1, 2])}")
    lines.append(f"sha256sum {' '.join(names)} > /tmp/sums && mv /tmp/sums sums.txt")
    return " && ".join(lines)


class Soak:
    def __init__(self, node: JobNode, args: argparse.Namespace) -> None:
        self.node = node
        self.args = args
        self.rng = random.Random(args.seed)
        self.assigned: list[str] = []
        self.ends: dict[str, dict[str, Any]] = {}
        self.unacked: set[str] = set()
        self.faults: collections.Counter[str] = collections.Counter()

    def log(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:7.1f}s] {text}", flush=True)

    def run(self) -> None:
        args, rng = self.args, self.rng
        self.t0 = time.monotonic()
        deadline = self.t0 + args.max_seconds
        # Fault times spread over the expected assignment period.
        span = max(10.0, args.jobs * 1.2)
        plan = sorted(
            [(rng.uniform(2, span), "cp") for _ in range(args.cp_restarts)]
            + [(rng.uniform(2, span), "agent") for _ in range(args.agent_kills)]
        )
        kills = 0
        while time.monotonic() < deadline:
            if self.node.agent.proc.poll() is not None:
                self.log("agent: died at its crash point; started again")
                self.faults["agent_died_at_point"] += 1
                self.node.respawn()
            self.collect()
            now = time.monotonic() - self.t0
            while plan and plan[0][0] <= now:
                _, what = plan.pop(0)
                if what == "cp":
                    self.restart_cp()
                else:
                    kills += 1
                    self.kill_agent(at_crash_point=kills % 2 == 0)
            active = len(self.assigned) - len(self.ends)
            if len(self.assigned) < args.jobs and active < args.slots:
                self.assign()
            if len(self.ends) == args.jobs and not plan:
                break
            time.sleep(0.2)
        self.collect()

    def assign(self) -> None:
        job_id = f"soak-{len(self.assigned):03d}"
        try:
            self.node.assign(job_id, job_script(self.rng), timeout_s=300)
        except NodeNotConnected:
            return  # the agent is (re)connecting: try again on the next round
        self.assigned.append(job_id)

    def collect(self) -> None:
        cp = self.node.cp
        if not cp.running:
            return
        for job_id in sorted(self.unacked):
            try:
                cp.ack(self.node.node_id, job_id)
                self.unacked.discard(job_id)
            except NodeNotConnected:
                break  # acked after the next session opens
        for job_id in self.assigned:
            if job_id in self.ends:
                continue
            states = cp.job_states(self.node.node_id, job_id)
            end = next((s for s in states if s.get("state") in TERMINAL), None)
            if end is not None:
                self.ends[job_id] = end
                self.unacked.add(job_id)
            elif rejected := self.node.messages("job.rejected", job_id):
                self.ends[job_id] = {"state": "rejected", "reason": rejected[0].get("code")}

    def restart_cp(self) -> None:
        self.faults["cp_restart"] += 1
        self.log("control plane: stop")
        self.node.cp.stop()
        time.sleep(self.rng.uniform(0.2, 2.0))
        self.node.cp.start()
        self.log("control plane: started again")

    def kill_agent(self, *, at_crash_point: bool) -> None:
        node = self.node
        if at_crash_point:
            point = self.rng.choice(CRASH_POINTS).format(n=self.rng.randint(1, 3))
            self.faults["agent_kill_at_point"] += 1
            self.log(f"agent: restart armed to SIGKILL itself at {point}")
            node.agent.proc.kill()
            node.respawn(env={ENV: point})
            self.log("agent: armed")
        else:
            self.faults["agent_sigkill"] += 1
            self.log("agent: SIGKILL")
            node.agent.proc.kill()
            node.respawn()
            self.log("agent: started again")


def ledger_entries(state_dir: Path) -> list[dict[str, Any]]:
    path = state_dir / "audit.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def report(soak: Soak) -> int:
    node, args = soak.node, soak.args
    # A job still running is waited for a little more, with no faults.
    deadline = time.monotonic() + 120
    while len(soak.ends) < len(soak.assigned) and time.monotonic() < deadline:
        if node.agent.proc.poll() is not None:
            node.respawn()
        soak.collect()
        time.sleep(0.5)
    time.sleep(3)  # containers and outputs go just after the end is sent

    by_end = collections.Counter(f"{e['state']}/{e.get('reason')}" for e in soak.ends.values())
    entries = ledger_entries(node.state_dir)
    started = collections.Counter(
        e.get("job_id") for e in entries if e.get("kind") == "container_started"
    )
    lost, duplicated, corrupted = [], [], []
    for job_id in soak.assigned:
        end = soak.ends.get(job_id, {})
        state = node.cp.results_state(node.node_id, job_id)
        files = {p: f.read_bytes() for p, f in node.cp.result_files(node.node_id, job_id).items()}
        if started[job_id] > 1:
            duplicated.append(f"{job_id}: container started {started[job_id]} times")
        manifests = {
            json.dumps(sorted(m["files"], key=lambda f: f["index"])) for m in state.manifests
        }
        if len(manifests) > 1:
            duplicated.append(f"{job_id}: results sent under {len(manifests)} manifests")
        own: dict[str, str] = {}
        if "sums.txt" in files:
            for line in files["sums.txt"].decode().splitlines():
                digest, name = line.split()
                own[name] = digest
        for name, digest in own.items():
            if name in files and hashlib.sha256(files[name]).hexdigest() != digest:
                corrupted.append(f"{job_id}: {name}")
        if end.get("exit_code") == 0:
            expected = set(own) | {"sums.txt"}
            if not own or set(files) != expected:
                lost.append(
                    f"{job_id}: {end.get('state')}/{end.get('reason')}, accepted {sorted(files)}"
                )
    left = node.containers()
    ended_left = [c for c in left if c.labels.get("cloudbender.job-id") in soak.ends]
    outputs_left = sorted(p.name for p in (node.state_dir / "jobs").glob("*"))
    verify = node.audit_verify()
    cp_node = node.cp.node(node.node_id)
    violations = list(cp_node.violations) if cp_node is not None else ["no node at the CP"]

    print()
    print(
        f"soak, seed {args.seed}: {len(soak.assigned)} jobs assigned in "
        f"{time.monotonic() - soak.t0:.0f} s; faults: {dict(soak.faults)}"
    )
    print("ended by state/reason:")
    for key, n in sorted(by_end.items()):
        print(f"  {key:40s} {n}")
    unfinished = [j for j in soak.assigned if j not in soak.ends]
    print(f"not ended            : {len(unfinished)} {unfinished[:5]}")
    print(f"lost                 : {len(lost)} {lost[:5]}")
    print(f"duplicated           : {len(duplicated)} {duplicated[:5]}")
    print(f"corrupted            : {len(corrupted)} {corrupted[:5]}")
    print(f"containers left      : {len(ended_left)} (of ended jobs), {len(left)} in all")
    print(f"outputs left         : {len(outputs_left)} {outputs_left[:5]}")
    print(f"protocol violations  : {len(violations)} {violations[:3]}")
    print(f"audit --verify       : exit {verify.returncode}: {verify.stdout.strip()[:200]}")
    bad = lost or duplicated or corrupted or ended_left or outputs_left or unfinished
    return 1 if bad or violations or verify.returncode != 0 else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--cp-restarts", type=int, default=8)
    parser.add_argument("--agent-kills", type=int, default=5)
    parser.add_argument("--slots", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-seconds", type=float, default=900)
    args = parser.parse_args()
    client = docker.from_env()
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        limits = {"max_concurrent_jobs": args.slots, "max_memory_mib": 256, "max_cpus": 1}
        with job_node(Path(tmp), client, limits=limits) as node:
            soak = Soak(node, args)
            soak.run()
            return report(soak)


if __name__ == "__main__":
    sys.exit(main())
