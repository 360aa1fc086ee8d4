"""How the reference CP stores and acknowledges results (§5): cumulative acks, acks
only after the bytes are durable, one rename at publish. Driven by a raw agent."""

from __future__ import annotations

import asyncio
import os
import threading

from tests.controlplane.rawagent import manifest, raw_agent, read_all
from tests.controlplane.wire import NODE, cp_with, run
from tests.helpers.env import seconds

KIB = 1024


def test_ten_thousand_small_files_get_a_handful_of_cumulative_acks() -> None:
    """Attack: a CP that acks each file makes the agent handle 10,000 acks (two futures
    and a wait each) for 10,000 files of 1 KiB, about a third of the time per file. With
    revision 1.1's cumulative acks, one ack per durable point covers every file before it."""
    files = [(f"d{i % 7}/f{i}", os.urandom(KIB)) for i in range(10_000)]

    async def main() -> None:
        async with cp_with() as cp, raw_agent(cp) as agent:
            assert (await agent.upload("j-many", files))["type"] == "result.accepted"
            acks = [(a["file"], a["offset"]) for a in agent.of_type("result.ack")]
            # 10,000 KiB: a durable point after 4 and 8 MiB and after the last byte.
            assert len(acks) <= 4, acks
            assert acks == sorted(acks) and acks[-1] == (9_999, KIB)
            state = cp.results_state(NODE, "j-many")
            assert read_all(state.files) == dict(files)

    run(main())


def test_no_ack_leaves_before_the_durable_point_returns() -> None:
    """Attack: a CP that acks bytes it has only handed to the page cache lets the agent
    delete its spooled copy; a crash of the CP then loses results that were acked. The
    durable point is held in the worker (before its fdatasync); no ack may come first."""
    hold = threading.Event()

    async def main() -> None:
        async with cp_with() as cp, raw_agent(cp) as agent:
            fault = await cp.results_fault("j-1", hold_durable=hold)
            try:
                await agent.send(manifest("j-1", [("a", b"abc")]))
                await agent.expect("result.resume")
                await agent.send_file("j-1", 0, b"abc")  # the last byte: a durable point
                waiting = await asyncio.to_thread(fault.durable_waiting.wait, seconds(5))
                assert waiting, "no durable point was queued"
                await agent.barrier(cp)  # every message before it was handled
                assert agent.of_type("result.ack") == []
                assert cp.results_state(NODE, "j-1").acks == ()
            finally:
                hold.set()
            assert await agent.expect("result.ack") == {
                "type": "result.ack",
                "job_id": "j-1",
                "file": 0,
                "offset": 3,
            }

    run(main())


def test_results_are_published_by_one_rename_of_the_partial_directory() -> None:
    """Attack: publishing file by file costs a rename (and a journal entry) per file, and
    a reader of the results directory sees half a result meanwhile. The accepted
    directory must be the very directory the files were received into."""
    files = [("top.csv", b"a,b\n"), ("plots/deep/x.bin", os.urandom(3 * KIB)), ("e", b"")]

    async def main() -> None:
        async with cp_with() as cp, raw_agent(cp) as agent:
            await agent.send(manifest("j-1", files))
            await agent.expect("result.resume")
            for index, (_, data) in enumerate(files):
                await agent.send_file("j-1", index, data)
            await agent.barrier(cp)
            partial = cp.results_dir / "+partial" / NODE / "j-1" / "files"
            inode = partial.stat().st_ino
            await agent.send({"type": "result.end", "job_id": "j-1"})
            assert (await agent.verdict())["type"] == "result.accepted"
            final = cp.results_dir / NODE / "j-1"
            assert final.stat().st_ino == inode
            assert not partial.exists()
            assert read_all(cp.results_state(NODE, "j-1").files) == dict(files)

    run(main())
