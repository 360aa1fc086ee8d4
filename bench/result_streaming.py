"""Result streaming (docs/benchmarks.md), measured against baselines in the same run.

1. One 1 GiB result file: from the job's exit (``job.state uploading`` at the control
   plane) to ``result.accepted``, through the real agent and the reference control
   plane on loopback — spooling (copy + sha256), streaming with flow control, the CP
   storing and verifying — against raw asyncio TCP moving the same bytes from disk
   over loopback. Prints the throughput ratio (goal ≥ 0.5, stretch 0.6) and the agent's
   RSS growth while streaming (goal < 32 MiB).
   Two raw TCP baselines are measured in the same run: sender and receiver in this one
   process (the one the ratio is taken against, as the budget says) and in two
   processes (each side with a core of its own, as the agent and the CP have).
2. 10,000 result files of 1 KiB, job exit → accepted (goal ≤ 60 µs a file, the CP's
   results on tmpfs), against one file of the same total size, both through the agent;
   once with the control plane's results directory on tmpfs (``/dev/shm``) and once on
   disk (the system's temporary directory).

Also says whether websockets' C speed-ups (``websockets.speedups``) are in use.

Run: ``.venv/bin/python bench/result_streaming.py [--mib N] [--small-files N] [--quick]
[--json PATH]`` with a Docker engine up and the local test image built (``make images``).
Needs about 4 GiB of free disk (``--quick``: 64 MiB and 500 files).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import docker
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._report import add_report_args, metric, write_json
from tests.helpers.jobnode import JobNode, job_node

MIB = 1024 * 1024


def log_time(node: JobNode, event: str, job_id: str, kind: str | None = None) -> float:
    """When the agent logged ``event`` for ``job_id`` (an ``audit_entry``: of ``kind``)."""
    for line in node.agent.log().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if (entry.get("event"), entry.get("job_id")) == (event, job_id) and (
            kind is None or entry.get("kind") == kind
        ):
            return datetime.fromisoformat(entry["timestamp"]).timestamp()
    raise AssertionError(f"no {event} for {job_id} in the agent's log")


def upload_seconds(node: JobNode, job_id: str, script: str) -> tuple[float, int, int]:
    """Seconds from ``uploading`` to accepted at the CP, the agent's RSS at ``uploading``
    and its peak growth from there."""
    proc = psutil.Process(node.agent.proc.pid)
    node.assign(job_id, script, timeout_s=3600)
    node.wait_state(job_id, "uploading", timeout=600)
    started = time.perf_counter()
    base = proc.memory_info().rss
    peak = base
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    end = node.wait_end(job_id, timeout=600)
    took = time.perf_counter() - started
    stop.set()
    sampler.join()
    assert end["state"] == "succeeded", end
    return took, base, peak - base


async def raw_tcp_seconds(path: Path) -> float:
    """Send ``path`` over asyncio TCP on loopback to a receiver that reads it all."""
    size = os.stat(path).st_size
    done = asyncio.get_running_loop().create_future()

    async def receive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got = 0
        while chunk := await reader.read(MIB):
            got += len(chunk)
        writer.close()
        done.set_result(got)

    server = await asyncio.start_server(receive, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    started = time.perf_counter()
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    with open(path, "rb") as f:  # noqa: ASYNC230 - the baseline reads as the agent does
        while chunk := f.read(MIB):
            writer.write(chunk)
            await writer.drain()
    writer.close()
    got = await done
    took = time.perf_counter() - started
    server.close()
    assert got == size
    return took


# The receiving side of the two-process baseline: reads until EOF, then says how much.
_RECEIVER = """
import asyncio, sys
async def main():
    done = asyncio.get_running_loop().create_future()
    async def receive(reader, writer):
        got = 0
        while chunk := await reader.read(1024 * 1024):
            got += len(chunk)
        writer.write(str(got).encode())
        await writer.drain()
        writer.close()
        done.set_result(None)
    server = await asyncio.start_server(receive, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await done
    server.close()
asyncio.run(main())
"""


async def raw_tcp_two_process_seconds(path: Path) -> float:
    """Like :func:`raw_tcp_seconds`, the receiver in a process of its own."""
    size = os.stat(path).st_size
    # Started before the clock, and nothing else runs on this loop.
    receiver = subprocess.Popen(  # noqa: ASYNC220
        [sys.executable, "-c", _RECEIVER], stdout=subprocess.PIPE, text=True
    )
    try:
        assert receiver.stdout is not None
        port = int(receiver.stdout.readline())
        started = time.perf_counter()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        with open(path, "rb") as f:  # noqa: ASYNC230 - the baseline reads as the agent does
            while chunk := f.read(MIB):
                writer.write(chunk)
                await writer.drain()
        writer.write_eof()
        got = int(await reader.read())
        took = time.perf_counter() - started
        writer.close()
    finally:
        receiver.wait(timeout=60)
    assert got == size
    return took


def small_files_seconds(node: JobNode, results_root: Path, n: int, tag: str) -> tuple[float, float]:
    """``n`` files of 1 KiB vs one file of ``n`` KiB, job exit → accepted, with the CP's
    results stored under ``results_root``."""
    node.cp.cp.results.root = results_root  # read when a job's first manifest comes
    many = (
        "cd /opt/output && i=0; while [ $i -lt "
        f"{n} ]; do head -c 1024 /dev/urandom > f$i; i=$((i+1)); done"
    )
    many_s, _, _ = upload_seconds(node, f"bench-many-{tag}", many)
    one = f"head -c {n * 1024} /dev/urandom > /opt/output/one.bin"
    one_s, _, _ = upload_seconds(node, f"bench-one-{tag}", one)
    return many_s, one_s


def speedups() -> str:
    """Whether websockets masks and unmasks frames in C."""
    import websockets

    found = importlib.util.find_spec("websockets.speedups") is not None
    return f"websockets {websockets.__version__}, C speed-ups {'in use' if found else 'MISSING'}"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=1024, help="size of the big result")
    parser.add_argument("--small-files", type=int, default=10_000)
    add_report_args(parser)
    args = parser.parse_args()
    if args.quick:
        args.mib, args.small_files = 64, 500
    client = docker.from_env()
    n = args.small_files
    with (
        tempfile.TemporaryDirectory() as tmp,
        tempfile.TemporaryDirectory(prefix="bench-cp-", dir="/dev/shm") as shm,
    ):
        tmp_path = Path(tmp)
        limits = {"max_memory_mib": 512}
        results = {"max_bytes": 4 * 1024 * MIB, "max_files": 20_000}
        with job_node(tmp_path / "node", client, limits=limits, results=results) as node:
            disk_root = node.cp.cp.results.root
            big = f"dd if=/dev/urandom of=/opt/output/big.bin bs=1M count={args.mib} 2>/dev/null"
            agent_s, rss_base, rss_growth = upload_seconds(node, "bench-big", big)
            spooled = log_time(node, "results_spooled", "bench-big")
            stream_s = log_time(node, "results_accepted", "bench-big") - spooled
            # Between the two: the job's output is unmounted and deleted, then the files
            # are recorded in the ledger; the first byte leaves after that.
            recorded = log_time(node, "audit_entry", "bench-big", "result_file_sent")
            spool_file = node.state_dir / "spool" / "bench-big" / "data"  # the one file
            raw_s = asyncio.run(raw_tcp_seconds(spool_file))
            raw2_s = asyncio.run(raw_tcp_two_process_seconds(spool_file))
            many_shm_s, one_shm_s = small_files_seconds(node, Path(shm), n, "tmpfs")
            many_s, one_s = small_files_seconds(node, disk_root, n, "disk")
    size = args.mib * MIB

    def rate(seconds: float) -> str:
        return f"{seconds:6.2f} s  {size / seconds / MIB:7.1f} MiB/s"

    print(f"result streaming, {args.mib} MiB, loopback, this machine ({speedups()}):")
    print(f"  job exit -> accepted (spool + stream):  {rate(agent_s)}")
    print(f"  spooled -> accepted (streaming):        {rate(stream_s)}")
    print(f"    of which output removed + ledger:     {recorded - spooled:6.2f} s")
    print(f"    recorded -> accepted (the upload):    {rate(stream_s - (recorded - spooled))}")
    print(f"  raw asyncio TCP, one process:           {rate(raw_s)}")
    print(f"  raw asyncio TCP, two processes:         {rate(raw2_s)}")
    print(f"  throughput ratio streaming / raw:       {raw_s / stream_s:6.2f}  (goal >= 0.5)")
    print(f"  ... / raw in two processes:             {raw2_s / stream_s:6.2f}")
    print(f"  throughput ratio end to end / raw:      {raw_s / agent_s:6.2f}")
    print(f"  agent RSS growth while streaming:       {rss_growth / MIB:6.1f} MiB (goal < 32 MiB)")
    print(f"{n} files of 1 KiB vs one file of {n} KiB, through the agent, job exit -> accepted:")
    for where, many, one in (("tmpfs", many_shm_s, one_shm_s), ("disk ", many_s, one_s)):
        print(
            f"  CP results on {where}: many {many:6.2f} s, one {one:6.2f} s, "
            f"{many / n * 1e6:7.1f} µs a file (goal <= 60 µs on tmpfs)"
        )
    mibps = "MiB/s"
    write_json(
        args.json,
        [
            metric(
                "result_streaming.stream",
                size / MIB / stream_s,
                size / MIB / raw_s,
                "ratio >= 0.5",
                mibps,
            ),
            metric(
                "result_streaming.end_to_end", size / MIB / agent_s, size / MIB / raw_s, None, mibps
            ),
            metric(
                "result_streaming.rss_growth", rss_growth / MIB, rss_base / MIB, "value < 32", "MiB"
            ),
            metric(
                "result_streaming.tcp_two_process",
                size / MIB / raw2_s,
                size / MIB / raw_s,
                None,
                mibps,
            ),
            metric(
                "result_streaming.small_files",
                many_shm_s / n * 1e6,
                one_shm_s / n * 1e6,
                "value <= 60",
                "µs/file",
            ),
            metric(
                "result_streaming.small_files_disk",
                many_s / n * 1e6,
                one_s / n * 1e6,
                None,
                "µs/file",
            ),
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
