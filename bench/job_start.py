"""Job start overhead: ``job.assign`` sent → ``job.state running`` received, on loopback,
against the raw docker SDK ``create`` + ``start`` of the same image and settings, in the
same run. Budget (docs/benchmarks.md): agent ≤ raw + 10 ms.

Run: ``.venv/bin/python bench/job_start.py [--runs N] [--quick] [--json PATH]`` with a
Docker engine up and the local test image built (``make images``). Prints medians and the
difference (``--quick``: 3 runs).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import docker

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.runtime.base import ContainerSpec
from agent.runtime.spec import create_kwargs
from bench._report import add_report_args, metric, write_json
from tests.helpers.jobnode import IMAGE, job_node


def raw_create_start(client: docker.DockerClient, image_id: str, workdir: Path, i: int) -> float:
    data, out = workdir / "data", workdir / f"out-{i}"
    data.mkdir(exist_ok=True)
    out.mkdir()
    spec = ContainerSpec(
        job_id=f"raw-{i}",
        node_id="bench-raw",
        image=IMAGE,
        image_id=image_id,
        command=("sleep", "30"),
        env={},
        user="65534:65534",
        data_dir=data,
        model_dir=None,
        output_dir=out,
        cpus=1,
        memory_mib=256,
        pids=1024,
        tmp_mib=1024,
    )
    kwargs = create_kwargs(spec)
    start = time.perf_counter()
    container = client.containers.create(**kwargs)
    container.start()
    took = time.perf_counter() - start
    container.remove(force=True)
    return took


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    add_report_args(parser)
    args = parser.parse_args()
    if args.quick:
        args.runs = 3
    client = docker.from_env()
    image_id = str(client.images.get(IMAGE).id)
    agent_times: list[float] = []
    raw_times: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        with job_node(tmp_path / "node", client, runtime={"stop_grace_s": 1}) as node:
            for i in range(args.runs + 1):
                job_id = f"bench-{i}"
                sent = time.perf_counter()
                node.assign(job_id, "sleep 30")
                node.wait_state(job_id, "running", timeout=60)
                took = time.perf_counter() - sent
                if i > 0:  # the first run warms caches on both paths
                    agent_times.append(took)
                node.cp.send(node.node_id, {"type": "job.cancel", "job_id": job_id})
                node.wait_end(job_id, timeout=60)
                node.cp.ack(node.node_id, job_id)  # or the ack backlog refuses new jobs
                raw = raw_create_start(client, image_id, tmp_path, i)
                if i > 0:
                    raw_times.append(raw)
    agent_ms = statistics.median(agent_times) * 1000
    raw_ms = statistics.median(raw_times) * 1000
    print(f"job start, median of {args.runs} (this machine, Docker engine on loopback):")
    print(f"  agent  job.assign -> running : {agent_ms:7.1f} ms")
    print(f"  raw    SDK create + start    : {raw_ms:7.1f} ms")
    print(f"  overhead                     : {agent_ms - raw_ms:+7.1f} ms (budget +10 ms)")
    print(f"  ratio agent/raw              : {agent_ms / raw_ms:7.2f}")
    start = metric("job_start.assign_to_running", agent_ms, raw_ms, "value-baseline <= 10", "ms")
    write_json(args.json, [start])
    return 0


if __name__ == "__main__":
    sys.exit(main())
