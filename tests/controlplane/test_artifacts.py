"""The reference CP serves model artifacts (PROTOCOL.md §6), driven by a raw client."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from agent.controlplane import ControlPlane, ThreadedControlPlane
from agent.protocol import MAX_CHUNK_PAYLOAD, MAX_HEADER, SUBPROTOCOL
from agent.protocol.frames import decode_binary
from tests.controlplane.wire import NODE, TOKEN, cp_with, hello, recv_json, run, send_json, session
from tests.helpers.env import seconds

DATA = bytes(range(256)) * 1000  # 256000 bytes
SHA = hashlib.sha256(DATA).hexdigest()


@asynccontextmanager
async def big_session(cp: ControlPlane) -> AsyncIterator[ClientConnection]:
    """A session whose client accepts 1 MiB payloads (websockets' default is 1 MiB in all)."""
    async with connect(
        cp.url,
        subprotocols=[Subprotocol(SUBPROTOCOL)],
        additional_headers={"Authorization": f"Bearer {TOKEN}"},
        max_size=MAX_CHUNK_PAYLOAD + MAX_HEADER + 4,
    ) as ws:
        await send_json(ws, hello())
        assert (await recv_json(ws))["type"] == "welcome"
        yield ws


def get(artifact: str = "mdl-9", offset: Any = 0) -> dict[str, Any]:
    return {"type": "artifact.get", "artifact": artifact, "offset": offset}


async def receive_artifact(
    ws: ClientConnection,
) -> tuple[list[tuple[dict[str, Any], bytes]], dict[str, Any]]:
    """Chunks (header, payload) until a text frame; that text frame."""
    chunks: list[tuple[dict[str, Any], bytes]] = []
    async with asyncio.timeout(seconds(5)):
        while True:
            data = await ws.recv()
            if isinstance(data, str):
                return chunks, json.loads(data)
            frame = decode_binary(data)
            chunks.append((frame.header, bytes(frame.payload)))


def test_artifact_is_streamed_in_chunks_then_end() -> None:
    async def main() -> None:
        async with cp_with() as cp, session(cp) as (ws, _):
            assert await cp.add_artifact("mdl-9", DATA, chunk_bytes=100_000) == SHA
            await send_json(ws, get())
            chunks, end = await receive_artifact(ws)
            assert [h for h, _ in chunks] == [
                {"type": "artifact.chunk", "artifact": "mdl-9", "offset": o}
                for o in (0, 100_000, 200_000)
            ]
            assert b"".join(p for _, p in chunks) == DATA
            assert end == {"type": "artifact.end", "artifact": "mdl-9", "size": len(DATA)} | {
                "sha256": SHA
            }
            node = cp.nodes()[NODE]
            assert node.artifact_offsets("mdl-9") == [0]
            assert node.sent[-1] == end
            assert node.violations == []

    run(main())


def test_default_chunks_are_at_most_one_mib() -> None:
    big = bytes(2 * MAX_CHUNK_PAYLOAD + 5)

    async def main() -> None:
        async with cp_with() as cp, big_session(cp) as ws:
            await cp.add_artifact("big", big)
            await send_json(ws, get("big"))
            chunks, end = await receive_artifact(ws)
            assert [len(p) for _, p in chunks] == [MAX_CHUNK_PAYLOAD, MAX_CHUNK_PAYLOAD, 5]
            assert end["size"] == len(big)
            with pytest.raises(ValueError, match="chunk_bytes"):
                await cp.add_artifact("x", b"", chunk_bytes=MAX_CHUNK_PAYLOAD + 1)

    run(main())


def test_resume_from_an_offset_and_from_the_end() -> None:
    async def main() -> None:
        async with cp_with() as cp, session(cp) as (ws, _):
            await cp.add_artifact("mdl-9", DATA, chunk_bytes=100_000)
            await send_json(ws, get(offset=150_000))
            chunks, end = await receive_artifact(ws)
            assert [h["offset"] for h, _ in chunks] == [150_000, 250_000]
            assert b"".join(p for _, p in chunks) == DATA[150_000:]
            assert end["size"] == len(DATA)
            await send_json(ws, get(offset=len(DATA)))
            chunks, end = await receive_artifact(ws)
            assert chunks == [] and end["type"] == "artifact.end"
            assert cp.nodes()[NODE].artifact_offsets("mdl-9") == [150_000, len(DATA)]

    run(main())


def test_unknown_artifact_is_an_error_naming_it() -> None:
    async def main() -> None:
        async with cp_with() as cp, session(cp) as (ws, _):
            await send_json(ws, get("mdl-404"))
            chunks, reply = await receive_artifact(ws)
            assert chunks == []
            assert reply == {
                "type": "error",
                "code": "unknown_artifact",
                "detail": "mdl-404",
                "ref": "artifact.get",
            }
            assert cp.nodes()[NODE].violations == []

    run(main())


@pytest.mark.parametrize(
    ("message", "detail"),
    [
        (get(offset=-1), "offset -1 is outside"),
        (get(offset=len(DATA) + 1), "is outside"),
        (get(offset="0"), "field 'offset' must be an int"),
        (get(offset=True), "field 'offset' must be an int"),
        ({"type": "artifact.get", "artifact": "mdl-9"}, "missing field 'offset'"),
        ({"type": "artifact.get", "artifact": 9, "offset": 0}, "field 'artifact' must be a str"),
    ],
    ids=["negative", "past-end", "string", "bool", "missing", "artifact-type"],
)
def test_bad_requests_are_bad_message_and_the_session_goes_on(
    message: dict[str, Any], detail: str
) -> None:
    async def main() -> None:
        async with cp_with() as cp, session(cp) as (ws, _):
            await cp.add_artifact("mdl-9", DATA)
            await send_json(ws, message)
            chunks, reply = await receive_artifact(ws)
            assert chunks == []
            assert reply["type"] == "error" and reply["code"] == "bad_message"
            assert reply["ref"] == "artifact.get" and detail in reply["detail"]
            await send_json(ws, get(offset=len(DATA)))  # still served
            _, end = await receive_artifact(ws)
            assert end["type"] == "artifact.end"

    run(main())


async def drain(ws: ClientConnection, payloads: list[bytes]) -> None:
    """Collect chunk payloads until the connection closes (raises ConnectionClosed)."""
    async with asyncio.timeout(seconds(5)):
        while True:
            data = await ws.recv()
            assert isinstance(data, bytes)
            payloads.append(bytes(decode_binary(data).payload))


def test_drop_fault_closes_once_after_exactly_n_bytes() -> None:
    async def main() -> None:
        async with cp_with() as cp:
            await cp.add_artifact("mdl-9", DATA, chunk_bytes=64 * 1024)
            await cp.artifact_fault("mdl-9", drop_after_bytes=100_000)
            async with session(cp) as (ws, first):
                await send_json(ws, get())
                payloads: list[bytes] = []
                with pytest.raises(ConnectionClosed):
                    await drain(ws, payloads)
                received = b"".join(payloads)
                assert received == DATA[:100_000]
                assert ws.close_code == 1001
            async with session(cp) as (ws, second):
                await send_json(ws, get(offset=len(received)))
                chunks, end = await receive_artifact(ws)  # the fault fired once
                assert received + b"".join(p for _, p in chunks) == DATA
                assert end["sha256"] == SHA
            requests = cp.nodes()[NODE].artifact_requests
            assert [(r.offset, r.session) for r in requests] == [
                (0, first["session"]),
                (100_000, second["session"]),
            ]

    run(main())


def test_end_fault_lies_about_sha256_and_size() -> None:
    async def main() -> None:
        async with cp_with() as cp, session(cp) as (ws, _):
            await cp.add_artifact("mdl-9", DATA)
            await cp.artifact_fault("mdl-9", end_sha256="0" * 64, end_size=7)
            await send_json(ws, get())
            chunks, end = await receive_artifact(ws)
            assert b"".join(p for _, p in chunks) == DATA  # the bytes are the truth
            assert (end["sha256"], end["size"]) == ("0" * 64, 7)
            await cp.artifact_fault("mdl-9")  # cleared
            await send_json(ws, get(offset=len(DATA)))
            _, end = await receive_artifact(ws)
            assert (end["sha256"], end["size"]) == (SHA, len(DATA))

    run(main())


def test_threaded_api_serves_artifacts() -> None:
    with ThreadedControlPlane({TOKEN: "*"}) as cp:
        assert cp.add_artifact("mdl-9", DATA, chunk_bytes=200_000) == SHA
        cp.artifact_fault("mdl-9", end_size=1)

        async def client() -> tuple[list[tuple[dict[str, Any], bytes]], dict[str, Any]]:
            async with session(cp.cp) as (ws, _):
                await send_json(ws, get())
                return await receive_artifact(ws)

        chunks, end = asyncio.run(client())
        assert [len(p) for _, p in chunks] == [200_000, 56_000]
        assert end["size"] == 1
        node = cp.node(NODE)
        assert node is not None and node.artifact_offsets("mdl-9") == [0]
