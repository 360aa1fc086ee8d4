"""Downloading model artifacts over the control-plane session (docs/protocol.md §6).

:class:`ArtifactFetcher` asks with ``artifact.get`` and writes the ``artifact.chunk``
payloads to a partial file in its spool as they arrive (memory stays bounded by one
frame), hashing on the way; :mod:`agent.models.download` holds the verification rules.
The job manager routes the CP's messages to it: ``artifact.chunk`` →
:meth:`~ArtifactFetcher.on_chunk`, ``artifact.end`` → :meth:`~ArtifactFetcher.on_end`,
``error`` → :meth:`~ArtifactFetcher.on_error`, and calls
:meth:`~ArtifactFetcher.on_session` after each ``welcome``.

- After a session ends, the next one (a new ``uplink.generation``) gets one
  ``artifact.get`` per fetch in flight, from the bytes held (resume).
- Chunks, ends and errors for an artifact not in flight are dropped.
- Fetches of one artifact at the same time share one download when they expect the
  same sha256 and size; with other expectations they wait for it to end first (the
  wire cannot tell two streams of one artifact apart).

Spool files (``spool_dir`` is ``0700``, files ``0600``) are named by a counter, never
by the CP's artifact name. Files left by a crash are removed at start.
"""

from __future__ import annotations

import asyncio
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from agent.errors import ModelStorageError, ModelUnavailable
from agent.fsutil import discard_tree
from agent.link import Uplink
from agent.models.download import Download
from agent.protocol import messages
from agent.protocol.messages import ArtifactChunk, ArtifactEnd
from agent.protocol.session import PeerError

log = structlog.get_logger(__name__)

# Without on_session (a missed welcome), a waiting fetch still notices a new session.
RECHECK_S = 1.0
_SHA256 = re.compile(r"[0-9a-f]{64}")
_PREFIX = "artifact-"


@dataclass(eq=False)
class _Flight:
    """A download in flight and the callers waiting for it."""

    download: Download
    asked: int | None = None  # the uplink generation of the last artifact.get
    waiters: int = 0
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[Path] | None = None


class ArtifactFetcher:
    """Fetches artifacts over the session held by ``uplink`` into ``spool_dir``.

    ``max_bytes`` caps an artifact whose size the assignment does not give (None: no
    cap). Construct on the event loop's thread at startup; :meth:`close` at shutdown.
    """

    def __init__(self, uplink: Uplink, spool_dir: Path, *, max_bytes: int | None = None) -> None:
        self._uplink = uplink
        self.spool_dir = spool_dir
        self._max_bytes = max_bytes
        self._flights: dict[str, _Flight] = {}
        self._serial = 0
        spool_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(spool_dir, 0o700)
        self._remove_leftovers()

    def _remove_leftovers(self) -> None:
        # Never raises: a leftover that cannot be removed costs disk space, an
        # exception here would stop the agent at every start.
        try:
            leftovers = list(self.spool_dir.glob(_PREFIX + "*"))
        except OSError as exc:
            log.warning("artifact_spool_cleanup_failed", error=exc.strerror)
            return
        for leftover in leftovers:
            # discard_tree: a directory of that name is not ours either.
            discard_tree(leftover, event="artifact_spool_cleanup_failed")

    def in_flight(self) -> list[str]:
        """The artifacts being downloaded now."""
        return list(self._flights)

    async def fetch(
        self,
        artifact: str,
        expected_sha256: str,
        expected_size: int | None,
        timeout_s: float,
        *,
        max_bytes: int | None = None,
    ) -> Path:
        """Download ``artifact``, verified against ``expected_sha256`` (and size, if given).

        ``max_bytes`` tightens the fetcher's own cap for this artifact (a download
        shared with an earlier caller keeps that caller's cap).

        Returns a file in the spool that belongs to the caller, who must remove it.
        Raises :class:`ModelChecksumMismatch`, :class:`ModelUnavailable` (unknown to
        the CP, too large, or not delivered within ``timeout_s``, waiting for a session
        included) or :class:`ModelStorageError`. Cancelling a caller leaves the others
        of a shared download waiting; the last one to leave stops it.
        """
        if not _SHA256.fullmatch(expected_sha256):
            raise ValueError("expected_sha256 must be 64 lowercase hex digits")
        cap = min((c for c in (self._max_bytes, max_bytes) if c is not None), default=None)
        if expected_size is not None and cap is not None and expected_size > cap:
            raise ModelUnavailable(f"artifact {artifact!r} is larger than the cache allows")
        deadline = asyncio.get_running_loop().time() + timeout_s
        late = f"artifact {artifact!r} not delivered within {timeout_s:g}s"
        try:
            async with asyncio.timeout_at(deadline):
                flight = await self._join(artifact, expected_sha256, expected_size, cap)
        except TimeoutError as exc:
            raise ModelUnavailable(late) from exc
        flight.waiters += 1
        try:
            assert flight.task is not None
            async with asyncio.timeout_at(deadline):
                part = await asyncio.shield(flight.task)
            return self._hand_out(part)
        except TimeoutError as exc:
            raise ModelUnavailable(late) from exc
        finally:
            self._leave(flight)

    async def _join(self, artifact: str, sha256: str, size: int | None, cap: int | None) -> _Flight:
        while True:
            current = self._flights.get(artifact)
            if current is None:
                return self._start(artifact, sha256, size, cap)
            if current.download.sha256 == sha256 and current.download.size == size:
                return current
            assert current.task is not None
            # Both would be fed by one stream: let the other finish, whatever its end.
            await asyncio.wait({current.task})

    def _start(self, artifact: str, sha256: str, size: int | None, cap: int | None) -> _Flight:
        flight = _Flight(Download(artifact, sha256, size, cap, self._spool_path(".part")))
        flight.task = asyncio.create_task(self._run(flight), name="artifact fetch")
        self._flights[artifact] = flight
        return flight

    def _spool_path(self, suffix: str) -> Path:
        self._serial += 1
        return self.spool_dir / f"{_PREFIX}{self._serial}{suffix}"

    def _hand_out(self, part: Path) -> Path:
        # Every caller gets its own name for the verified file, so that each can remove
        # its own; the partial name goes when the last caller has left.
        mine = self._spool_path(".tar")
        try:
            os.link(part, mine)
        except OSError as exc:
            raise ModelStorageError(f"spool: {exc.strerror}", exc.errno) from exc
        return mine

    def _leave(self, flight: _Flight) -> None:
        flight.waiters -= 1
        if flight.waiters > 0 or flight.task is None:
            return
        if not flight.task.done():
            flight.task.cancel()
        else:
            flight.download.part.unlink(missing_ok=True)

    async def _run(self, flight: _Flight) -> Path:
        d = flight.download
        try:
            while True:
                flight.wake.clear()
                if d.failure is not None:
                    raise d.failure
                if d.complete:
                    return d.part
                generation = self._uplink.generation
                if self._uplink.connected and flight.asked != generation:
                    get = messages.artifact_get(d.artifact, d.held)
                    if await self._uplink.send(get):
                        flight.asked = generation
                        log.info("artifact_requested", artifact=d.artifact, offset=d.held)
                        continue
                # Also after a failed send: the session is ending, and retrying at once
                # would spin without ever letting the connection detach it.
                await self._wait(flight)
        finally:
            if self._flights.get(d.artifact) is flight:
                del self._flights[d.artifact]
            d.close()
            if not d.complete:
                d.part.unlink(missing_ok=True)

    async def _wait(self, flight: _Flight) -> None:
        waits: set[asyncio.Future[Any]] = {asyncio.ensure_future(flight.wake.wait())}
        if not self._uplink.connected:
            waits.add(asyncio.ensure_future(self._uplink.wait_connected()))
        try:
            await asyncio.wait(waits, timeout=RECHECK_S, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()

    # -- routed from the session: synchronous, on the receive path ---------------------

    def on_chunk(self, chunk: ArtifactChunk) -> None:
        """Append a chunk to its download, or drop it (see :mod:`agent.models.download`).

        Writes to the spool file before returning: the session reads its next frame only
        after this, which bounds memory to one frame.
        """
        flight = self._flights.get(chunk.header.artifact)
        if flight is None:
            log.debug("artifact_chunk_dropped", why="not in flight")
            return
        if not flight.download.take_chunk(chunk.header.offset, chunk.payload):
            log.debug("artifact_chunk_dropped", why="offset", offset=chunk.header.offset)
        if flight.download.failure is not None:
            flight.wake.set()

    def on_end(self, end: ArtifactEnd) -> None:
        """Judge an ``artifact.end``: complete, failed, or ask again from the bytes held."""
        flight = self._flights.get(end.artifact)
        if flight is None:
            return
        if flight.download.take_end(end.size, end.sha256):
            flight.asked = None
        flight.wake.set()

    def on_error(self, error: PeerError) -> bool:
        """Fail the download an ``unknown_artifact`` error names. True if there was one."""
        if error.code != "unknown_artifact" or error.detail is None:
            return False
        flight = self._flights.get(error.detail)
        if flight is None or not flight.download.open:
            return False
        flight.download.fail(
            ModelUnavailable(f"the control plane has no artifact {error.detail!r}")
        )
        flight.wake.set()
        return True

    def on_session(self) -> None:
        """A session was established: every fetch in flight asks again from its offset."""
        for flight in self._flights.values():
            flight.wake.set()

    async def close(self) -> None:
        """Fail every download in flight (:class:`ModelUnavailable`) and wait for them."""
        tasks = []
        for flight in list(self._flights.values()):
            flight.download.fail(ModelUnavailable("the agent is shutting down"))
            flight.wake.set()
            if flight.task is not None:
                tasks.append(flight.task)
        await asyncio.gather(*tasks, return_exceptions=True)
