"""The reference CP receives results (PROTOCOL.md §5), driven by a hand-written agent."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from agent.controlplane import ControlPlane
from tests.controlplane.rawagent import MIB, RawAgent, manifest, raw_agent, read_all
from tests.controlplane.wire import NODE, TOKEN, cp_with, run
from tests.helpers.env import seconds

FILES = [
    ("scores.csv", b"id,score\n" + b"1,0.5\n" * 1000),
    ("plots/big.bin", os.urandom(2 * MIB + 12345)),
    ("empty.txt", b""),
]


def test_fresh_upload_is_stored_byte_identical_and_acked() -> None:
    async def main() -> None:
        async with cp_with() as cp, raw_agent(cp) as agent:
            await agent.send(manifest("j-1", FILES))
            assert await agent.expect("result.resume") == {
                "type": "result.resume",
                "job_id": "j-1",
                "offsets": [0, 0, 0],
            }
            for index, (_, data) in enumerate(FILES):
                await agent.send_file("j-1", index, data)
            await agent.send({"type": "result.end", "job_id": "j-1"})
            assert await agent.verdict() == {"type": "result.accepted", "job_id": "j-1"}
            state = await cp.wait_for_results(NODE, "j-1", seconds(5))
            files = cp.result_files(NODE, "j-1")
            assert read_all(files) == dict(FILES)
            assert files["plots/big.bin"] == cp.results_dir / NODE / "j-1" / "plots" / "big.bin"
            assert not list((cp.results_dir / "+partial").rglob("*.bin"))
            # Acks: cumulative across files (revision 1.1), the last one covering all.
            acks = [(a["file"], a["offset"]) for a in agent.of_type("result.ack")]
            assert acks == sorted(acks) and acks[-1] == (2, 0)
            assert state.chunks == 1 + 3 and state.wire_bytes == sum(len(d) for _, d in FILES)
            assert (state.ends, state.accepted, state.rejected, state.drops) == (1, 1, (), 0)
            assert state.resumes == ((0, 0, 0),) and state.held == tuple(len(d) for _, d in FILES)
            assert state.manifests == (manifest("j-1", FILES),)
            assert 0 < state.max_unacked <= 4 * MIB
            assert cp.nodes()[NODE].violations == []

    run(main())


def test_empty_results_are_a_resume_of_nothing_then_accepted() -> None:
    async def main() -> None:
        async with cp_with() as cp, raw_agent(cp) as agent:
            assert await agent.upload("j-0", []) == {"type": "result.accepted", "job_id": "j-0"}
            assert agent.of_type("result.resume")[0]["offsets"] == []
            assert cp.result_files(NODE, "j-0") == {}
            assert cp.results_state(NODE, "j-0").done
            assert (cp.results_dir / NODE / "j-0").is_dir()
            assert cp.nodes()[NODE].violations == []

    run(main())


def test_after_a_dropped_session_resume_offers_the_bytes_held() -> None:
    data = os.urandom(6 * MIB + 7)

    async def main() -> None:
        async with cp_with() as cp:
            async with raw_agent(cp) as agent:
                await agent.send(manifest("j-1", [("a", b"abc"), ("b", data)]))
                await agent.expect("result.resume")
                await agent.send_file("j-1", 0, b"abc")
                await agent.send_file("j-1", 1, data, upto=5 * MIB)
                await agent.expect("result.ack")  # file 0 complete
            await cp.wait_for_disconnect(NODE, seconds(5))
            assert cp.result_files(NODE, "j-1") == {}
            async with raw_agent(cp) as agent:
                await agent.send(manifest("j-1", [("a", b"abc"), ("b", data)]))
                resume = await agent.expect("result.resume")
                assert resume["offsets"] == [3, 5 * MIB]
                await agent.send_file("j-1", 1, data, 5 * MIB)
                await agent.send({"type": "result.end", "job_id": "j-1"})
                assert (await agent.verdict())["type"] == "result.accepted"
            state = cp.results_state(NODE, "j-1")
            assert state.resumes == ((0, 0), (3, 5 * MIB))
            assert state.wire_bytes == 3 + len(data)  # not a byte twice
            assert read_all(cp.result_files(NODE, "j-1")) == {"a": b"abc", "b": data}
            assert cp.nodes()[NODE].violations == []

    run(main())


def test_results_already_accepted_are_accepted_again_exactly_once() -> None:
    files = [("a", b"abc")]

    async def main() -> None:
        async with cp_with() as cp:
            async with raw_agent(cp) as agent:
                assert (await agent.upload("j-1", files))["type"] == "result.accepted"
            async with raw_agent(cp) as agent:
                await agent.send(manifest("j-1", files))
                assert await agent.expect("result.accepted") == {
                    "type": "result.accepted",
                    "job_id": "j-1",
                }
                await agent.send({"type": "result.end", "job_id": "j-1"})
                assert (await agent.expect("result.accepted"))["job_id"] == "j-1"
                assert agent.of_type("result.resume") == []
                # Other files for results already accepted: refused, the first kept.
                await agent.send(manifest("j-1", [("a", b"abd")]))
                error = await agent.expect("error")
                assert (error["code"], error["ref"]) == ("bad_message", "result.manifest")
            state = cp.results_state(NODE, "j-1")
            assert (state.accepted, len(state.manifests), len(state.resumes)) == (3, 3, 1)
            assert read_all(cp.result_files(NODE, "j-1")) == {"a": b"abc"}

    run(main())


def test_another_manifest_for_the_same_job_starts_over() -> None:
    async def main() -> None:
        async with cp_with() as cp, raw_agent(cp) as agent:
            await agent.send(manifest("j-1", [("a", b"12345678")]))
            await agent.expect("result.resume")
            await agent.send_file("j-1", 0, b"12345678", upto=4)
            await agent.send(manifest("j-1", [("a", b"1234"), ("b", b"x")]))
            assert (await agent.expect("result.resume"))["offsets"] == [0, 0]
            verdict = await agent.upload("j-1", [("a", b"1234"), ("b", b"x")])
            assert verdict["type"] == "result.accepted"
            assert read_all(cp.result_files(NODE, "j-1")) == {"a": b"1234", "b": b"x"}
            assert cp.nodes()[NODE].violations == [
                "result.manifest: j-1: unlike the earlier one; starting over"
            ]

    run(main())


def test_a_new_control_plane_on_the_same_directory_resumes(tmp_path: Path) -> None:
    data = os.urandom(3 * MIB)

    async def main() -> None:
        async with ControlPlane({TOKEN: "*"}, results_dir=tmp_path) as cp, raw_agent(cp) as agent:
            await agent.send(manifest("j-1", [("d", data)]))
            await agent.expect("result.resume")
            await agent.send_file("j-1", 0, data, upto=2 * MIB)
            assert (await agent.upload("j-2", [("e", b"e")]))["type"] == "result.accepted"
        async with ControlPlane({TOKEN: "*"}, results_dir=tmp_path) as cp, raw_agent(cp) as agent:
            await agent.send(manifest("j-2", [("e", b"e")]))
            assert (await agent.expect("result.accepted"))["job_id"] == "j-2"
            await agent.send(manifest("j-1", [("d", data)]))
            assert (await agent.expect("result.resume"))["offsets"] == [2 * MIB]
            await agent.send_file("j-1", 0, data, 2 * MIB)
            await agent.send({"type": "result.end", "job_id": "j-1"})
            assert (await agent.verdict())["type"] == "result.accepted"
            assert read_all(cp.result_files(NODE, "j-1")) == {"d": data}
            assert cp.nodes()[NODE].violations == []

    run(main())


def _entry(**changes: Any) -> dict[str, Any]:
    return {"index": 0, "path": "a", "size": 1, "sha256": "0" * 64} | changes


@pytest.mark.parametrize(
    ("files", "total", "detail"),
    [
        ([_entry(index=1)], 1, "files[0].index is 1, expected 0"),
        ([_entry(path="../x")], 1, "files[0].path has an empty, '.' or '..' component"),
        ([_entry(path="/etc/x")], 1, "files[0].path is absolute"),
        ([_entry(path="a//b")], 1, "files[0].path has an empty"),
        ([_entry(path="a\\b")], 1, "files[0].path holds a backslash"),
        ([_entry(path="")], 1, "files[0].path is empty"),
        ([_entry(size=-1)], -1, "files[0].size is negative"),
        ([_entry(sha256="A" * 64)], 1, "files[0].sha256 is not 64 lowercase hex"),
        ([_entry(sha256="0" * 63)], 1, "files[0].sha256 is not 64 lowercase hex"),
        ([_entry()], 2, "total_bytes 2 is not the sum of the sizes, 1"),
        ([_entry(), _entry(index=1)], 2, "path 'a' is listed twice"),
        ([_entry(), _entry(index=1, path="a/b")], 2, "path 'a' is both a file and a directory"),
        (["a"], 0, "files[0] is not a JSON object"),
        ([{"index": 0, "path": "a", "size": 1}], 1, "files[0].sha256 is missing"),
        ([_entry(size=True)], 1, "files[0].size is missing or not an int"),
    ],
)
def test_bad_manifests_are_bad_message_and_the_session_goes_on(
    files: list[Any], total: int, detail: str
) -> None:
    async def main() -> None:
        async with cp_with() as cp, raw_agent(cp) as agent:
            bad = {"type": "result.manifest", "job_id": "j-1", "total_bytes": total, "files": files}
            await agent.send(bad)
            error = await agent.expect("error")
            assert (error["code"], error["ref"]) == ("bad_message", "result.manifest")
            assert error["detail"].startswith(detail), error["detail"]
            assert cp.nodes()[NODE].violations == [
                f"result.manifest: answered bad_message: {error['detail']}"
            ]
            assert (await agent.upload("j-2", [("a", b"1")]))["type"] == "result.accepted"

    run(main())


async def _started(agent: RawAgent, data: bytes) -> None:
    await agent.send(manifest("j-1", [("a", data)]))
    await agent.expect("result.resume")


@pytest.mark.parametrize(
    ("header", "payload", "detail"),
    [
        ({"offset": 2}, b"x", "offset 2 of file 0, expected 0"),
        ({"file": 1}, b"x", "file 1 is not in the manifest"),
        ({}, b"x" * 11, "file 0 would be longer than its size in the manifest"),
        ({"job_id": "j-9"}, b"x", "no result.manifest for this job"),
    ],
    ids=["out-of-order", "no-such-file", "too-long", "unknown-job"],
)
def test_chunks_that_do_not_continue_their_file_are_refused_and_not_stored(
    header: dict[str, Any], payload: bytes, detail: str
) -> None:
    data = b"0123456789"

    async def main() -> None:
        async with cp_with() as cp, raw_agent(cp) as agent:
            await _started(agent, data)
            fields: dict[str, Any] = {"job_id": "j-1", "file": 0, "offset": 0} | header
            await agent.chunk(fields["job_id"], fields["file"], fields["offset"], payload)
            error = await agent.expect("error")
            assert (error["code"], error["ref"], error["detail"]) == (
                "bad_message",
                "result.chunk",
                detail,
            )
            assert cp.results_state(NODE, "j-1").held == (0,)
            await agent.send_file("j-1", 0, data)  # the session goes on
            await agent.send({"type": "result.end", "job_id": "j-1"})
            assert (await agent.verdict())["type"] == "result.accepted"

    run(main())


def test_chunks_and_end_need_a_manifest_in_their_own_session() -> None:
    async def main() -> None:
        async with cp_with() as cp:
            async with raw_agent(cp) as agent:
                await _started(agent, b"abc")
            await cp.wait_for_disconnect(NODE, seconds(5))
            async with raw_agent(cp) as agent:
                await agent.chunk("j-1", 0, 0, b"abc")
                await agent.send({"type": "result.end", "job_id": "j-1"})
                first, second = await agent.expect("error"), await agent.expect("error")
                assert (first["ref"], second["ref"]) == ("result.chunk", "result.end")
                assert (
                    "in this session" in first["detail"] and "in this session" in second["detail"]
                )
            assert cp.results_state(NODE, "j-1").held == (0,)

    run(main())


def test_odd_ids_cannot_leave_the_results_directory() -> None:
    """A node id of ``../../etc`` and a job id of ``..`` as a way out of the results
    directory: the node's files stay inside it, and since 1.1 ``..`` is no job id at all
    (a letter or digit first), so its manifest is refused and nothing is stored."""

    async def main() -> None:
        async with cp_with() as cp, raw_agent(cp, node_id="../../etc") as agent:
            assert (await agent.upload("j-1", [("x", b"1")]))["type"] == "result.accepted"
            stored = cp.result_files("../../etc", "j-1")["x"]
            assert stored.resolve().is_relative_to(cp.results_dir.resolve())
            assert stored.read_bytes() == b"1"
            await agent.send(manifest("..", [("x", b"1")]))
            refused = await agent.expect("error")
            assert (refused["code"], refused["ref"]) == ("bad_message", "result.manifest")
            assert cp.result_files("../../etc", "..") == {}

    run(main())
