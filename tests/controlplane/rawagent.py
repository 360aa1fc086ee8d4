"""A hand-written agent side of §4 and §5, on a raw websockets client: no agent code.

:class:`RawAgent` reads every text frame in the background (so that the CP's acks
never back up), hands them out by type, and sends manifests and chunks by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from agent.controlplane import ControlPlane
from agent.protocol import MAX_CHUNK_PAYLOAD, MAX_HEADER, SUBPROTOCOL
from agent.protocol.frames import encode_binary
from tests.controlplane.wire import CLIENT_LOGGER, NODE, TOKEN, heartbeat, hello
from tests.helpers.env import seconds

MIB = 1024 * 1024


def manifest(job_id: str, files: Sequence[tuple[str, bytes]], **changes: Any) -> dict[str, Any]:
    """A correct ``result.manifest`` for ``(path, content)`` pairs."""
    entries = [
        {"index": i, "path": path, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        for i, (path, data) in enumerate(files)
    ]
    total = sum(len(data) for _, data in files)
    message: dict[str, Any] = {"type": "result.manifest", "job_id": job_id, "total_bytes": total}
    return message | {"files": entries} | changes


def read_all(files: dict[str, Path]) -> dict[str, bytes]:
    """The content of stored result files, by path."""
    return {path: file.read_bytes() for path, file in files.items()}


def job_state(job_id: str, state: str, **fields: Any) -> dict[str, Any]:
    return {"type": "job.state", "job_id": job_id, "state": state, "ts": 1764280001.2} | fields


class RawAgent:
    """One connection past ``welcome``, with a background reader."""

    def __init__(self, ws: ClientConnection, welcome: dict[str, Any], node_id: str = NODE) -> None:
        self.ws = ws
        self.welcome = welcome
        self.node_id = node_id
        self.seq = 0
        self.received: list[dict[str, Any]] = []
        self.closed = False
        self._taken: set[int] = set()
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for data in self.ws:
                if isinstance(data, str):
                    self.received.append(json.loads(data))
                    self._changed.set()
        except ConnectionClosed:
            pass
        finally:
            self.closed = True
            self._changed.set()

    async def expect(self, *types: str, timeout: float = 5.0) -> dict[str, Any]:  # noqa: ASYNC109
        """The oldest text message of one of ``types`` not yet returned; each is returned once."""
        async with asyncio.timeout(seconds(timeout)):
            while True:
                for i, message in enumerate(self.received):
                    if i not in self._taken and message["type"] in types:
                        self._taken.add(i)
                        return message
                if self.closed:
                    raise ConnectionError(f"closed before {types}; got {self.received}")
                self._changed.clear()
                await self._changed.wait()

    def of_type(self, type_: str) -> list[dict[str, Any]]:
        return [m for m in self.received if m["type"] == type_]

    def acked(self, job_id: str, file: int) -> int:
        offsets = [
            m["offset"]
            for m in self.of_type("result.ack")
            if (m["job_id"], m["file"]) == (job_id, file)
        ]
        return max(offsets, default=0)

    async def send(self, message: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(message))

    async def chunk(self, job_id: str, file: int, offset: int, payload: bytes) -> None:
        header = {"type": "result.chunk", "job_id": job_id, "file": file, "offset": offset}
        await self.ws.send(encode_binary(header, payload))

    async def send_file(
        self, job_id: str, file: int, data: bytes, offset: int = 0, upto: int | None = None
    ) -> None:
        """Chunks of ``data[offset:upto]``, 1 MiB at most each; acks are not waited for."""
        end = len(data) if upto is None else upto
        while offset < end:
            n = min(MAX_CHUNK_PAYLOAD, end - offset)
            await self.chunk(job_id, file, offset, data[offset : offset + n])
            offset += n

    async def upload(
        self, job_id: str, files: Sequence[tuple[str, bytes]], **changes: Any
    ) -> dict[str, Any]:
        """Manifest, resume, every file from its offset, end; the verdict message."""
        await self.send(manifest(job_id, files, **changes))
        resume = await self.expect("result.resume")
        for index, (offset, (_, data)) in enumerate(zip(resume["offsets"], files, strict=True)):
            await self.send_file(job_id, index, data, offset)
        await self.send({"type": "result.end", "job_id": job_id})
        return await self.verdict()

    async def verdict(self) -> dict[str, Any]:
        return await self.expect("result.accepted", "result.rejected", timeout=10)

    async def barrier(self, cp: ControlPlane) -> None:
        """Return once the CP has handled everything sent before (a heartbeat round trip)."""
        self.seq += 1
        seq = self.seq
        node = cp.node(self.node_id)
        mark = len(node.messages) if node is not None else 0
        await self.send(heartbeat(seq))
        await cp.wait_for_message(
            self.node_id, "heartbeat", lambda m: m["seq"] == seq, seconds(5), after_index=mark
        )

    async def quiet(self, type_: str, for_s: float = 0.3) -> bool:
        """True if no new ``type_`` message arrives within ``for_s``."""
        with contextlib.suppress(TimeoutError):
            await self.expect(type_, timeout=for_s)
            return False
        return True


@asynccontextmanager
async def raw_agent(
    cp: ControlPlane, node_id: str = NODE, **hello_changes: Any
) -> AsyncIterator[RawAgent]:
    """A session whose client takes 1 MiB frames; yields once ``welcome`` came."""
    async with connect(
        cp.url,
        subprotocols=[Subprotocol(SUBPROTOCOL)],
        additional_headers={"Authorization": f"Bearer {TOKEN}"},
        max_size=MAX_CHUNK_PAYLOAD + MAX_HEADER + 4,
        compression=None,  # as the agent: bulk bytes, no permessage-deflate
        close_timeout=seconds(2),
        logger=logging.getLogger(CLIENT_LOGGER),
    ) as ws:
        await ws.send(json.dumps(hello(node_id, **hello_changes)))
        data = await asyncio.wait_for(ws.recv(), seconds(5))
        welcome = json.loads(data)
        assert welcome["type"] == "welcome", welcome
        agent = RawAgent(ws, welcome, node_id)
        try:
            yield agent
        finally:
            agent._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await agent._reader
