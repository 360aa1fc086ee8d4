"""§2 on the CP side: bad frames are answered with error and the session goes on."""

from __future__ import annotations

import asyncio
import json
import logging
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.sync.client import connect as sync_connect

from agent.controlplane import ThreadedControlPlane
from agent.controlplane.jobs import build_assign
from agent.protocol import MAX_CHUNK_PAYLOAD, MAX_HEADER, MAX_INCOMING_FRAME, SUBPROTOCOL
from agent.protocol.frames import encode_binary
from tests.controlplane.wire import (
    CLIENT_LOGGER,
    NODE,
    TOKEN,
    cp_with,
    heartbeat,
    hello,
    recv_json,
    run,
    send_json,
    session,
)
from tests.helpers.env import seconds

BAD_FRAMES: list[tuple[str, str | bytes, str, str | None]] = [
    # (id, frame, error code, ref)
    ("not-json", "{nope", "bad_message", None),
    ("array", "[1, 2]", "bad_message", None),
    ("string", '"heartbeat"', "bad_message", None),
    ("missing-type", '{"seq": 1}', "bad_message", None),
    ("type-not-string", '{"type": 5}', "bad_message", None),
    ("nan", '{"type": "heartbeat", "seq": 9, "ts": NaN}', "bad_message", None),
    ("deep", "[" * 100_000 + "]" * 100_000, "bad_message", None),
    ("unknown-type", '{"type": "job.teleport", "job_id": "j-1"}', "unknown_type", "job.teleport"),
    ("seq-string", '{"type": "heartbeat", "seq": "1", "ts": 1.5}', "bad_message", "heartbeat"),
    ("seq-bool", '{"type": "heartbeat", "seq": true, "ts": 1.5}', "bad_message", "heartbeat"),
    ("ts-missing", '{"type": "heartbeat", "seq": 1}', "bad_message", "heartbeat"),
    (
        "job-state-ts",
        '{"type": "job.state", "job_id": "j", "state": "running"}',
        "bad_message",
        "job.state",
    ),
    ("cp-type", '{"type": "welcome", "session": "x", "heartbeat_s": 1}', "bad_message", "welcome"),
    ("second-hello", json.dumps(hello()), "bad_message", "hello"),
    ("short-binary", b"\x00\x00", "bad_message", None),
    ("binary-past-end", struct.pack(">I", 99) + b"{}", "bad_message", None),
    # decode_binary lets json's RecursionError through; the CP catches it.
    (
        "binary-deep",
        struct.pack(">I", 200_000) + b"[" * 100_000 + b"]" * 100_000,
        "bad_message",
        None,
    ),
    ("binary-not-object", struct.pack(">I", 2) + b"[]", "bad_message", None),
    ("binary-unknown", encode_binary({"type": "x.chunk"}, b"1"), "unknown_type", "x.chunk"),
    (
        "binary-as-text",
        '{"type": "result.chunk", "job_id": "j", "file": 0, "offset": 0}',
        "bad_message",
        "result.chunk",
    ),
    (
        "text-as-binary",
        encode_binary({"type": "heartbeat", "seq": 1, "ts": 1.0}),
        "bad_message",
        "heartbeat",
    ),
    (
        "chunk-fields",
        encode_binary({"type": "result.chunk", "job_id": "j"}, b"x"),
        "bad_message",
        "result.chunk",
    ),
]


@pytest.mark.parametrize(
    ("frame", "code", "ref"), [f[1:] for f in BAD_FRAMES], ids=[f[0] for f in BAD_FRAMES]
)
def test_bad_frame_gets_the_right_error_and_the_session_goes_on(
    frame: str | bytes, code: str, ref: str | None
) -> None:
    async def main() -> None:
        async with cp_with() as cp, session(cp) as (ws, _):
            await ws.send(frame)
            reply = await recv_json(ws)
            assert reply["type"] == "error" and reply["code"] == code, reply
            assert reply.get("ref") == ref
            assert isinstance(reply["detail"], str) and reply["detail"]
            await send_json(ws, heartbeat(1))
            await cp.wait_for_message(NODE, "heartbeat", timeout=seconds(5))
            node = cp.nodes()[NODE]
            assert node.connected
            assert [h.seq for h in node.heartbeats] == [1]
            assert len(node.violations) == 1, node.violations

    run(main())


def test_a_malformed_error_is_recorded_but_never_answered() -> None:
    async def main() -> None:
        async with cp_with() as cp, session(cp) as (ws, _):
            await send_json(ws, {"type": "error", "code": 42})
            await send_json(ws, heartbeat(1))
            await cp.wait_for_message(NODE, "heartbeat", timeout=seconds(5))
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(ws.recv(), seconds(0.2))
            node = cp.nodes()[NODE]
            assert node.errors == []
            assert node.violations == ["error: not answered: field 'code' must be a str"]

    run(main())


def test_unknown_fields_are_ignored_and_binary_chunks_recorded() -> None:
    async def main() -> None:
        async with cp_with() as cp, session(cp) as (ws, _):
            await send_json(ws, heartbeat(1, future_field={"x": [1]}))
            chunk = {"type": "result.chunk", "job_id": "j-1", "file": 0, "offset": 0}
            await ws.send(encode_binary(chunk, b"payload"))
            got = await cp.wait_for_message(NODE, "result.chunk", timeout=seconds(5))
            assert got == chunk
            # Well-formed, but no manifest came first: refused, the session goes on.
            reply = await recv_json(ws)
            assert (reply["code"], reply["ref"]) == ("bad_message", "result.chunk")
            node = cp.nodes()[NODE]
            # Result bytes are stored as files, never kept in the message log.
            assert node.messages[-1].payload is None
            assert [m.type for m in node.messages] == ["hello", "heartbeat", "result.chunk"]
            assert node.violations == [
                "result.chunk: answered bad_message: no result.manifest for this job"
            ]

    run(main())


def test_later_message_types_are_checked_and_recorded() -> None:
    messages: list[dict[str, Any]] = [
        {"type": "job.accepted", "job_id": "j-1"},
        {"type": "job.rejected", "job_id": "j-2", "code": "no_capacity", "detail": "busy"},
        {"type": "job.state", "job_id": "j-1", "state": "accepted", "ts": 1.0},
        {"type": "job.state", "job_id": "j-1", "state": "failed", "ts": 2, "reason": "oom_killed"}
        | {"exit_code": 137},
        {"type": "result.manifest", "job_id": "j-1", "total_bytes": 0, "files": []},
        {"type": "result.end", "job_id": "j-1"},
        {"type": "artifact.get", "artifact": "mdl-9", "offset": 0},
    ]
    wrong: list[dict[str, Any]] = [
        {"type": "job.state", "job_id": "j-3", "state": "exploded", "ts": 3.0},
        {"type": "job.state", "job_id": "j-4", "state": "succeeded", "ts": 3.0},
        {"type": "job.rejected", "job_id": "j/2", "code": "nope"},
    ]

    async def main() -> None:
        async with cp_with() as cp, session(cp) as (ws, _):
            for job_id in ("j-1", "j-2", "j-3", "j-4"):
                await cp.assign(NODE, job_id, "registry.example/x:1", "vitals")
            # The API refuses an id that breaks §4 (BadAssignment); sent as it is here.
            await cp.send(NODE, build_assign("j/2", "registry.example/x:1", "vitals"))
            for message in messages + wrong:
                await send_json(ws, message)
            await cp.wait_for_message(NODE, "job.rejected", lambda m: m["code"] == "nope")
            node = cp.nodes()[NODE]
        assert [m.data for m in node.messages[1:]] == messages + wrong
        assert node.violations == [
            "job.state: state 'exploded' is not a job state",
            "job.state: j-3: job.state before job.accepted",
            "job.state: terminal state 'succeeded' has reason None",
            "job.state: j-4: job.state before job.accepted",
            "job.state: j-4: succeeded with exit_code None, expected 0",
            "job.state: j-4: succeeded before its results were accepted",
            "job.rejected: job_id 'j/2' is malformed",
            "job.rejected: rejection code 'nope' is not in §4",
        ]

    run(main())


# Sync and threaded: hypothesis drives one live session with arbitrary frames.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
frames = st.one_of(
    st.text(max_size=200),
    st.binary(max_size=200),
    json_values.map(json.dumps),
    st.builds(
        lambda t, rest: json.dumps({**rest, "type": t}),
        st.sampled_from(["heartbeat", "job.state", "result.manifest", "error", "hello", "x"]),
        st.dictionaries(
            st.sampled_from(["seq", "ts", "job_id", "files", "state", "code"]), json_values
        ),
    ),
    st.builds(
        lambda header, payload: struct.pack(">I", len(header)) + header + payload,
        json_values.map(lambda v: json.dumps(v).encode()),
        st.binary(max_size=50),
    ),
)


def test_no_frame_breaks_the_session() -> None:
    with (
        ThreadedControlPlane({TOKEN: "*"}) as cp,
        sync_connect(
            cp.url,
            subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
            additional_headers={"Authorization": f"Bearer {TOKEN}"},
            logger=logging.getLogger(CLIENT_LOGGER),
            # The CP's error replies are never read: an unbounded queue keeps the
            # client reading the socket, so that it sees the close frame at the end.
            max_queue=None,
        ) as ws,
    ):
        ws.send(json.dumps(hello()))
        assert json.loads(ws.recv(seconds(5)))["type"] == "welcome"
        counter = iter(range(1, 1_000_000))

        @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
        @given(frame=frames)
        def probe(frame: str | bytes) -> None:
            before = len(cp.node(NODE).messages)  # type: ignore[union-attr]
            ws.send(frame)
            seq = next(counter)
            ws.send(json.dumps(heartbeat(seq)))
            # The probe may itself be a heartbeat: ours is the one with this seq and gpus.
            cp.wait_for_message(
                NODE,
                "heartbeat",
                lambda m: m.get("seq") == seq and "gpus" in m,
                timeout=seconds(5),
                after_index=before,
            )

        probe()
        node = cp.node(NODE)
        assert node is not None and node.connected


async def _one_byte_upload(ws: Any) -> dict[str, Any]:
    """Announce job j-1's one result file of one byte; the header of its first chunk."""
    manifest = {"type": "result.manifest", "job_id": "j-1", "total_bytes": 1}
    manifest["files"] = [{"index": 0, "path": "a", "size": 1, "sha256": "0" * 64}]
    await send_json(ws, manifest)
    assert (await recv_json(ws))["type"] == "result.resume"
    return {"type": "result.chunk", "job_id": "j-1", "file": 0, "offset": 0}


def test_frame_sizes() -> None:
    async def main() -> None:
        async with cp_with() as cp, session(cp) as (ws, _):
            header = await _one_byte_upload(ws)
            await ws.send(encode_binary(header, bytes(MAX_CHUNK_PAYLOAD + 1)))
            reply = await recv_json(ws)
            assert (reply["code"], reply["ref"]) == ("bad_message", "result.chunk")
            assert cp.nodes()[NODE].violations == [
                "result.chunk: answered bad_message: "
                f"payload of {MAX_CHUNK_PAYLOAD + 1} bytes is over {MAX_CHUNK_PAYLOAD}"
            ]
            assert cp.results_state(NODE, "j-1").held == (0,)
            # Past 16 MiB plus a header allowance, websockets ends the session (1009).
            await ws.send(encode_binary(header, bytes(MAX_INCOMING_FRAME + MAX_HEADER)))
            gone = await cp.wait_for_disconnect(NODE, seconds(10))
            assert (gone.code, gone.by) == (1009, "cp")

    run(main())


def test_chunk_header_over_4_kib() -> None:
    """§2 caps a binary frame's header at 4 KiB; a longer one that still fits the frame
    is used, and its exact size recorded as a violation."""

    async def main() -> None:
        async with cp_with() as cp, session(cp) as (ws, _):
            header = await _one_byte_upload(ws)
            raw = json.dumps(header | {"pad": "x" * MAX_HEADER}).encode()
            await ws.send(struct.pack(">I", len(raw)) + raw + b"a")
            assert (await recv_json(ws))["type"] == "result.ack"  # stored, durable
            assert cp.nodes()[NODE].violations == [f"result.chunk: header of {len(raw)} bytes"]

    run(main())
