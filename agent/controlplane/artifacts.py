"""Model artifacts served by the reference control plane (docs/protocol.md §6).

:class:`ArtifactStore` holds each artifact's bytes in memory, with its sha256, and the
test faults armed on it. :func:`stream` answers one ``artifact.get`` whose artifact
and offset the caller has already checked: binary ``artifact.chunk`` frames from the
offset (payloads of at most ``chunk_bytes``, never more than 1 MiB), then
``artifact.end``.

Faults, for testing agents:

- ``drop_after_bytes=N``: the next response that reaches N bytes of payload sends
  exactly N, then closes the connection (1001); fired once. A response with fewer
  than N bytes left to send leaves it armed.
- ``end_sha256`` / ``end_size``: what ``artifact.end`` says instead of the truth, for
  as long as the fault is set.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Protocol

from agent.protocol import MAX_CHUNK_PAYLOAD
from agent.protocol.frames import encode_binary


@dataclass(frozen=True)
class Artifact:
    data: bytes
    sha256: str
    chunk_bytes: int

    @property
    def size(self) -> int:
        return len(self.data)


@dataclass
class Fault:
    drop_after_bytes: int | None = None
    end_sha256: str | None = None
    end_size: int | None = None


class ArtifactStore:
    """Artifacts by id, and their faults. Only the server's event loop may use it."""

    def __init__(self) -> None:
        self._artifacts: dict[str, Artifact] = {}
        self._faults: dict[str, Fault] = {}

    def add(self, artifact_id: str, data: bytes, chunk_bytes: int = MAX_CHUNK_PAYLOAD) -> str:
        """Serve ``data`` as ``artifact_id`` (replacing any earlier); its sha256 hex.

        Raises ``ValueError`` unless ``0 < chunk_bytes <= 1 MiB`` (§5's frame limit,
        which the CP keeps for its own chunks too).
        """
        if not 0 < chunk_bytes <= MAX_CHUNK_PAYLOAD:
            raise ValueError(f"chunk_bytes must be in 1..{MAX_CHUNK_PAYLOAD}")
        digest = hashlib.sha256(data).hexdigest()
        self._artifacts[artifact_id] = Artifact(bytes(data), digest, chunk_bytes)
        return digest

    def get(self, artifact_id: str) -> Artifact | None:
        return self._artifacts.get(artifact_id)

    def set_fault(self, artifact_id: str, fault: Fault) -> None:
        """Arm ``fault`` on ``artifact_id`` (replacing any earlier one)."""
        self._faults[artifact_id] = fault

    def fault(self, artifact_id: str) -> Fault:
        return self._faults.get(artifact_id) or Fault()


class Streamer(Protocol):
    """What :func:`stream` needs of the session."""

    async def send(self, message: dict[str, Any]) -> None: ...

    async def send_raw(self, data: str | bytes) -> None: ...

    async def drop(self) -> None:
        """Close the connection (the ``drop_after_bytes`` fault)."""


async def stream(ctx: Streamer, store: ArtifactStore, artifact_id: str, offset: int) -> int:
    """Send ``artifact_id`` from ``offset`` (``0 <= offset <= size``); the payload bytes sent.

    Raises what ``ctx.send`` raises when the connection closes meanwhile.
    """
    artifact = store.get(artifact_id)
    assert artifact is not None
    assert 0 <= offset <= artifact.size
    fault = store.fault(artifact_id)
    drop = fault.drop_after_bytes
    if drop is not None and artifact.size - offset < drop:
        drop = None  # not enough left in this response: the fault stays armed
    view = memoryview(artifact.data)
    sent = 0
    position = offset
    while position < artifact.size:
        n = min(artifact.chunk_bytes, artifact.size - position)
        if drop is not None:
            n = min(n, drop - sent)
        if n > 0:
            header = {"type": "artifact.chunk", "artifact": artifact_id, "offset": position}
            await ctx.send_raw(encode_binary(header, view[position : position + n]))
            position += n
            sent += n
        if drop is not None and sent >= drop:
            fault.drop_after_bytes = None
            await ctx.drop()
            return sent
    end = {
        "type": "artifact.end",
        "artifact": artifact_id,
        "size": artifact.size if fault.end_size is None else fault.end_size,
        "sha256": artifact.sha256 if fault.end_sha256 is None else fault.end_sha256,
    }
    await ctx.send(end)
    return sent
