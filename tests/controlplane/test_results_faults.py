"""Verdicts and faults of the reference CP's results (§5), driven by a raw agent."""

from __future__ import annotations

import contextlib
import errno
import os

import pytest
from websockets.exceptions import ConnectionClosed

from tests.controlplane.rawagent import MIB, manifest, raw_agent, read_all
from tests.controlplane.wire import NODE, cp_with, run
from tests.helpers.env import seconds


def test_drop_after_bytes_ends_the_connection_without_a_close_frame_once() -> None:
    data = os.urandom(8 * MIB)

    async def main() -> None:
        async with cp_with() as cp:
            await cp.results_fault("j-1", drop_after_bytes=3 * MIB - 1)
            async with raw_agent(cp) as agent:
                await agent.send(manifest("j-1", [("b", data)]))
                await agent.expect("result.resume")
                with contextlib.suppress(ConnectionClosed):  # may be cut off while sending
                    await agent.send_file("j-1", 0, data)
                with pytest.raises(ConnectionError):  # closed; no ack for what came after
                    await agent.expect("result.ack", timeout=5)
                # No closing handshake: as a network failure would end it.
                assert agent.ws.protocol.close_rcvd is None
            gone = await cp.wait_for_disconnect(NODE, seconds(5))
            assert (gone.by, gone.code) == ("network", None)
            async with raw_agent(cp) as agent:  # the fault fired once
                verdict = await agent.upload("j-1", [("b", data)])
                assert verdict["type"] == "result.accepted"
            state = cp.results_state(NODE, "j-1")
            # The chunk that crossed the mark was stored; nothing after it was read.
            assert state.resumes == ((0,), (3 * MIB,))
            assert state.drops == 1
            assert state.wire_bytes == len(data)
            assert cp.nodes()[NODE].violations == []

    run(main())


def test_reject_file_once_and_reject_always() -> None:
    async def main() -> None:
        async with cp_with() as cp, raw_agent(cp) as agent:
            await cp.results_fault("j-1", reject_file_once=0)
            files = [("a", b"a" * 10), ("b", b"b" * 20)]
            verdict = await agent.upload("j-1", files)
            assert verdict == {
                "type": "result.rejected",
                "job_id": "j-1",
                "file": 0,
                "code": "checksum_mismatch",
            }
            await agent.send_file("j-1", 0, b"a" * 10)
            await agent.send({"type": "result.end", "job_id": "j-1"})
            assert (await agent.verdict())["type"] == "result.accepted"

            await cp.results_fault(None, reject_always=1)  # every job
            await agent.send(manifest("j-2", files))
            await agent.expect("result.resume")
            await agent.send_file("j-2", 0, b"a" * 10)
            for _ in range(3):
                await agent.send_file("j-2", 1, b"b" * 20)
                await agent.send({"type": "result.end", "job_id": "j-2"})
                assert (await agent.verdict())["file"] == 1
            assert cp.results_state(NODE, "j-2").rejected == ((1, "checksum_mismatch"),) * 3
            assert cp.result_files(NODE, "j-2") == {}
            assert cp.nodes()[NODE].violations == []

    run(main())


def test_stop_acking_holds_the_acks_until_cleared() -> None:
    data = os.urandom(20 * MIB)
    window = 16 * MIB

    async def main() -> None:
        async with cp_with() as cp, raw_agent(cp) as agent:
            await cp.results_fault("j-1", stop_acking=True)
            await agent.send(manifest("j-1", [("big", data)]))
            await agent.expect("result.resume")
            await agent.send_file("j-1", 0, data, upto=window)  # the agent's window, full
            assert await agent.quiet("result.ack", 0.5)
            state = cp.results_state(NODE, "j-1")
            assert state.acks == () and state.withheld >= 1
            assert state.held[0] >= 12 * MIB  # stored and synced all the same
            await cp.results_fault("j-1")  # cleared: what was held back is acked at once
            ack = await agent.expect("result.ack")
            assert ack["offset"] == cp.results_state(NODE, "j-1").held[0]
            await agent.send_file("j-1", 0, data, window)
            await agent.send({"type": "result.end", "job_id": "j-1"})
            assert (await agent.verdict())["type"] == "result.accepted"
            state = cp.results_state(NODE, "j-1")
            assert window <= state.max_unacked <= window + MIB
            assert agent.acked("j-1", 0) == len(data)

    run(main())


def test_acks_held_for_a_session_that_ended_are_simply_dropped() -> None:
    async def main() -> None:
        async with cp_with() as cp:
            await cp.results_fault(None, stop_acking=True)
            async with raw_agent(cp) as agent:
                await agent.send(manifest("j-1", [("a", b"abc")]))
                await agent.expect("result.resume")
                await agent.send_file("j-1", 0, b"abc")
                await agent.barrier(cp)
                assert cp.results_state(NODE, "j-1").withheld == 1
            await cp.wait_for_disconnect(NODE, seconds(5))
            await cp.results_fault(None)  # nowhere to send the held ack: no error
            async with raw_agent(cp) as agent:
                assert (await agent.upload("j-1", [("a", b"abc")]))["type"] == "result.accepted"
            state = cp.results_state(NODE, "j-1")
            assert (state.resumes, state.acks) == (((0,), (3,)), ())

    run(main())


def test_a_wrong_file_is_rejected_forgotten_and_taken_again_from_zero() -> None:
    good = os.urandom(MIB + 10)
    bad = bytearray(good)
    bad[MIB + 3] ^= 1

    async def main() -> None:
        async with cp_with() as cp, raw_agent(cp) as agent:
            files = [("ok", b"fine"), ("x", good)]
            await agent.send(manifest("j-1", files))
            await agent.expect("result.resume")
            await agent.send_file("j-1", 0, b"fine")
            await agent.send_file("j-1", 1, bytes(bad))
            await agent.send({"type": "result.end", "job_id": "j-1"})
            rejected = {"type": "result.rejected", "job_id": "j-1", "file": 1}
            assert await agent.verdict() == rejected | {"code": "checksum_mismatch"}
            assert cp.results_state(NODE, "j-1").held == (4, 0)
            await agent.send_file("j-1", 1, good[:100])  # too short this time
            await agent.send({"type": "result.end", "job_id": "j-1"})
            assert await agent.verdict() == rejected | {"code": "size_mismatch"}
            await agent.send_file("j-1", 1, good)
            await agent.send({"type": "result.end", "job_id": "j-1"})
            assert (await agent.verdict())["type"] == "result.accepted"
            assert read_all(cp.result_files(NODE, "j-1")) == {"ok": b"fine", "x": good}
            state = cp.results_state(NODE, "j-1")
            assert state.rejected == ((1, "checksum_mismatch"), (1, "size_mismatch"))
            assert (state.ends, state.accepted) == (3, 1)
            assert cp.nodes()[NODE].violations == []

    run(main())


def test_a_failed_sync_is_never_acked_by_a_later_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """Attack (durability): the first durable point's ``fdatasync`` fails (EIO: the
    pages it covered may be lost) and Linux reports that only once, so the next
    ``fdatasync`` succeeds. Acking after it would tell the agent that lost bytes are
    stored; the failure must stay with the upload and no ack may follow."""
    data = os.urandom(8 * MIB)  # two durable points, at 4 and 8 MiB
    real, calls = os.fdatasync, []

    def failing_once(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(errno.EIO, "I/O error")
        real(fd)

    monkeypatch.setattr(os, "fdatasync", failing_once)

    async def main() -> None:
        async with cp_with() as cp, raw_agent(cp) as agent:
            await agent.send(manifest("j-1", [("b", data)]))
            await agent.expect("result.resume")
            await agent.send_file("j-1", 0, data)
            await agent.send({"type": "result.end", "job_id": "j-1"})
            # result.end waits for every durable point before its answer (or fails).
            with contextlib.suppress(ConnectionError, TimeoutError):
                await agent.expect("result.accepted", "result.rejected", "error", timeout=10)
            assert calls  # the failing sync ran
            assert agent.of_type("result.ack") == []

    run(main())
