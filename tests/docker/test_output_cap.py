"""A job's output lives on a file system of its own, capped at its result size."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import pytest

from agent.jobs.outputfs import headroom
from tests.helpers.jobnode import JobNode

pytestmark = pytest.mark.docker
MIB = 1024 * 1024


class DiskWatch:
    """Samples how much of the node's disk a job's output image really holds (its
    allocated blocks), from a thread, until stopped."""

    def __init__(self, image: Path) -> None:
        self.image = image
        self.most = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            with contextlib.suppress(FileNotFoundError):
                self.most = max(self.most, self.image.stat().st_blocks * 512)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.most


def test_a_job_writing_without_end_is_stopped_at_its_cap(node: JobNode) -> None:
    """Attack: a job with a 1 MiB result cap wrote 2 GiB into /opt/output while it ran,
    and the output stayed after the job failed. Now the job's writes fail at its cap,
    the agent stops it, it ends result_too_large with its exit code, the disk it held is
    at most the cap plus the documented headroom, and the output is gone afterwards."""
    cap, files = 8 * MIB, 10
    # Ignores every error and never stops by itself: 2 GiB if nothing stopped it.
    script = (
        "i=0; while [ $i -lt 32 ]; do "
        "dd if=/dev/zero of=/opt/output/f$((i % 4)) bs=1M count=64 2>/dev/null; "
        "i=$((i+1)); done; sleep 600"
    )
    watch = DiskWatch(node.output_dir("j-fill").parent / "output.img")
    try:
        node.assign("j-fill", script, results={"max_bytes": cap, "max_files": files}, timeout_s=120)
        end = node.wait_end("j-fill", timeout=90)
    finally:
        held = watch.stop()
    assert (end["state"], end["reason"]) == ("failed", "result_too_large"), node.agent.log()[-3000:]
    assert isinstance(end.get("exit_code"), int)  # stopped by the agent: 143 or 137
    assert cap <= held <= cap + headroom(cap, files), held
    assert node.cp.results_state(node.node_id, "j-fill").chunks == 0
    node.wait_gone("j-fill")


def test_an_output_over_the_cap_after_a_clean_exit_carries_the_exit_code(node: JobNode) -> None:
    """Review finding: result_too_large and result_invalid carried no exit_code although
    the container ran and exited 0 (PROTOCOL.md 1.1 makes it explicit)."""
    node.assign(
        "j-big",
        "dd if=/dev/zero of=/opt/output/a bs=1024 count=1536 2>/dev/null",
        results={"max_bytes": MIB},
    )
    end = node.wait_end("j-big")
    assert (end["state"], end["reason"], end.get("exit_code")) == ("failed", "result_too_large", 0)
    node.assign("j-link", "ln -s /etc/passwd /opt/output/passwd")
    end = node.wait_end("j-link")
    assert (end["state"], end["reason"], end.get("exit_code")) == ("failed", "result_invalid", 0)
    node.wait_gone("j-big")
    node.wait_gone("j-link")
