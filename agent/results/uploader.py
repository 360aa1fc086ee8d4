"""Streams spooled results to the control plane (docs/protocol.md §5), resumably, exactly once.

One :meth:`Uploader.deliver` per job: ``result.manifest`` → ``result.resume`` →
``result.chunk`` frames (files in index order, ≤ 1 MiB each) with at most
:data:`~agent.protocol.results.WINDOW` payload bytes sent but not acknowledged → ``result.end`` →
``result.accepted`` (done) or ``result.rejected`` (that file again from 0, then
``result.end`` again; the third rejection fails the job). If the session drops at
any step, the upload starts again at the manifest after the next ``welcome``, and
``result.resume`` lets it skip what the control plane already holds.

Nothing is sent that was not recorded first (docs/audit.md): before the first byte of a
job, each of its files not yet in the ledger gets ``result_file_sent`` (once per job,
also across agent restarts); before bytes that may already have left go again (a
resume below what was sent, a restart in the middle, a rejected file), the range gets
``result_range_resent``. The uploader keeps, per file, the high-water mark of what it
handed to the socket; a file recorded by an earlier run of the agent counts as sent
whole, since how far that run got is unknown.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from typing import Protocol

import structlog

from agent.errors import AgentError
from agent.faults import crash_point
from agent.heap import keep_freed_blocks
from agent.link import Uplink
from agent.protocol import MAX_CHUNK_PAYLOAD, messages
from agent.protocol.frames import FrameBuffer
from agent.protocol.results import (
    AwaitMessage,
    FileEntry,
    RecordResends,
    ResultMessage,
    ResultSender,
    SendChunk,
    SendMessage,
    TooManyRejections,
)
from agent.results.spool import Manifest, Spool

log = structlog.get_logger(__name__)


class UploadFailed(AgentError):
    """The control plane rejected the results too often; the job ends failed/agent_error."""

    reason = "agent_error"


class _SessionLost(Exception):
    pass


class EgressLedger(Protocol):
    """Where the uploader records what is about to leave (:class:`agent.audit.AuditLedger`).

    Each call returns once the record is durable, and raises an :class:`AgentError`
    when it cannot be made so: the upload then fails and sends nothing more.
    """

    def result_files_recorded(self, job_id: str) -> frozenset[str]:
        """The paths of the job already recorded as sent."""
        ...

    def result_files_sent(
        self, job_id: str, files: Sequence[tuple[str, int, str]]
    ) -> Sequence[object]:
        """Record ``(path, size, sha256)`` of each file not yet recorded for the job."""
        ...

    def result_ranges_resent(
        self, job_id: str, ranges: Sequence[tuple[str, int, int, str]]
    ) -> Sequence[object]:
        """Record ``(path, start, end, why)``: those bytes leave again."""
        ...


class Uploader:
    """Delivers spooled results, one :meth:`deliver` per job; the thin I/O loop around
    :class:`~agent.protocol.results.ResultSender`, which decides what to send."""

    def __init__(self, uplink: Uplink, spool: Spool, ledger: EgressLedger | None = None) -> None:
        self._uplink = uplink
        self._spool = spool
        self._ledger = ledger
        self._inboxes: dict[str, asyncio.Queue[ResultMessage]] = {}
        # One frame buffer, reused for every chunk: the payload is read into it behind
        # room for the header, so a chunk is never joined or copied before websockets
        # masks it (a fresh 1 MiB object per chunk costs page faults).
        self._frames = FrameBuffer(MAX_CHUNK_PAYLOAD)
        keep_freed_blocks()  # the mask's copy is still fresh per chunk: see heap.py

    def route(self, message: messages.Incoming) -> bool:
        """Hand a ``result.*`` message to its job's upload. False: no upload wants it."""
        if not isinstance(message, ResultMessage):
            return False
        inbox = self._inboxes.get(message.job_id)
        if inbox is None:
            return False
        inbox.put_nowait(message)
        return True

    async def deliver(self, manifest: Manifest) -> None:
        """Return once the control plane accepted every file. Raises :class:`UploadFailed`."""
        inbox: asyncio.Queue[ResultMessage] = asyncio.Queue()
        self._inboxes[manifest.job_id] = inbox
        try:
            high = await asyncio.to_thread(self._record_files, manifest)
            files = [FileEntry(f.path, f.size) for f in manifest.files]
            sender = ResultSender(manifest.job_id, manifest.to_message(), files, high)
            while True:
                generation = await self._uplink.wait_connected()
                sender.begin()
                try:
                    await self._attempt(sender, manifest, inbox, generation)
                    return
                except _SessionLost:
                    log.info("result_upload_interrupted", job_id=manifest.job_id)
                    sender.session_lost()
                    # A send can fail before the connection has noticed its own end:
                    # wait for that session to be gone, or this loop would spin on it.
                    # A newer session may already be up; waiting for its end would stall
                    # the upload for as long as it lasts.
                    if self._uplink.generation == generation:
                        await self._uplink.wait_disconnected()
                    while not inbox.empty():  # what the old session said is void
                        inbox.get_nowait()
        finally:
            self._inboxes.pop(manifest.job_id, None)

    def _record_files(self, manifest: Manifest) -> list[int]:
        """Record the files not recorded yet; their high-water marks (see module doc)."""
        files = manifest.files
        if self._ledger is None:
            return [0] * len(files)
        earlier = self._ledger.result_files_recorded(manifest.job_id)
        self._ledger.result_files_sent(
            manifest.job_id, [(f.path, f.size, f.sha256) for f in files if f.path not in earlier]
        )
        return [f.size if f.path in earlier else 0 for f in files]

    async def _attempt(
        self,
        sender: ResultSender,
        manifest: Manifest,
        inbox: asyncio.Queue[ResultMessage],
        generation: int,
    ) -> None:
        """One session's try. Raises :class:`_SessionLost` or :class:`UploadFailed`."""
        job_id = manifest.job_id
        files = _OpenFiles(self._spool, manifest)
        try:
            while True:
                try:
                    action = sender.next_action()
                except TooManyRejections as exc:
                    raise UploadFailed(str(exc)) from None
                finally:
                    for event, fields in sender.events:
                        log.info(event, job_id=job_id, **fields)
                    sender.events.clear()
                if isinstance(action, SendChunk):
                    files.read(action, self._frames.payload(action.size))
                    header = messages.result_chunk_header(job_id, action.file, action.offset)
                    frame = self._frames.frame(header, action.size)
                    if not await self._uplink.send_frame(header["type"], frame, action.size):
                        raise _SessionLost
                    crash_point("upload.chunk_sent")
                    sender.chunk_sent(action)
                elif isinstance(action, SendMessage):
                    if not await self._uplink.send(action.message):
                        raise _SessionLost
                elif isinstance(action, AwaitMessage):
                    sender.receive(await self._next(inbox, generation))
                elif isinstance(action, RecordResends):
                    if self._ledger is not None:
                        ranges = list(action.ranges)
                        await asyncio.to_thread(self._ledger.result_ranges_resent, job_id, ranges)
                else:
                    what = "results_already_accepted" if action.already else "results_accepted"
                    log.info(what, job_id=job_id, files=len(manifest.files))
                    return
        finally:
            files.close()

    async def _next(self, inbox: asyncio.Queue[ResultMessage], generation: int) -> ResultMessage:
        """The next message for this upload, or :class:`_SessionLost`."""
        if self._uplink.generation != generation:
            raise _SessionLost  # ended and replaced while no one was waiting on it
        if not inbox.empty():  # the common case under load: no tasks, no wait
            return inbox.get_nowait()
        lost = asyncio.ensure_future(self._uplink.wait_disconnected())
        get = asyncio.ensure_future(inbox.get())
        try:
            await asyncio.wait({lost, get}, return_when="FIRST_COMPLETED")
        finally:
            lost.cancel()
            if not get.done():
                get.cancel()
        if not get.done() or get.cancelled():
            raise _SessionLost
        return get.result()


class _OpenFiles:
    """The spooled bytes of one attempt, read with ``preadv``: the entry's one ``data``
    file, opened once (or, for an entry an earlier agent spooled one file per result,
    each file in turn)."""

    def __init__(self, spool: Spool, manifest: Manifest) -> None:
        self._spool = spool
        self._job_id = manifest.job_id
        self._fd: tuple[int, int] | None = None  # (file index or -1 for data, descriptor)
        self._starts: list[int] | None = None
        try:
            fd = os.open(spool.data_path(self._job_id), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return  # spooled by an earlier agent: one file per result
        self._fd, self._starts = (-1, fd), manifest.offsets

    def read(self, chunk: SendChunk, view: memoryview) -> None:
        """Fill ``view`` (``chunk.size`` bytes) with the chunk's bytes."""
        if self._starts is not None:
            at = self._starts[chunk.file] + chunk.offset
        else:
            at = chunk.offset
            if self._fd is None or self._fd[0] != chunk.file:
                self.close()
                path = self._spool.legacy_file_path(self._job_id, chunk.file)
                self._fd = (chunk.file, os.open(path, os.O_RDONLY | os.O_CLOEXEC))
        assert self._fd is not None
        if chunk.size and os.preadv(self._fd[1], [view], at) != chunk.size:
            raise AgentError(f"spooled file {chunk.file} of {self._job_id} is short")

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd[1])
            self._fd = None
