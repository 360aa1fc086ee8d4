"""Streams spooled results to the control plane (docs/protocol.md §5), resumably, exactly once.

One :meth:`Uploader.deliver` per job: ``result.manifest`` → ``result.resume`` →
``result.chunk`` frames (files in index order, ≤ 1 MiB each) with at most
:data:`WINDOW` payload bytes sent but not acknowledged → ``result.end`` →
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
from typing import Any, Protocol

import structlog

from agent.errors import AgentError
from agent.faults import crash_point
from agent.jobs.uplink import Uplink
from agent.protocol import MAX_CHUNK_PAYLOAD
from agent.protocol import messages as m
from agent.results.scan import ResultFile
from agent.results.spool import Manifest, Spool

log = structlog.get_logger(__name__)

WINDOW = 16 * 1024 * 1024
MAX_REJECTIONS = 3

ResultMessage = m.ResultResume | m.ResultAck | m.ResultAccepted | m.ResultRejected


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
    def __init__(self, uplink: Uplink, spool: Spool, ledger: EgressLedger | None = None) -> None:
        self._uplink = uplink
        self._spool = spool
        self._ledger = ledger
        self._inboxes: dict[str, asyncio.Queue[ResultMessage]] = {}

    def route(self, message: m.Incoming) -> bool:
        """Hand a ``result.*`` message to its job's upload. False: no upload wants it."""
        if not isinstance(
            message, m.ResultResume | m.ResultAck | m.ResultAccepted | m.ResultRejected
        ):
            return False
        inbox = self._inboxes.get(message.job_id)
        if inbox is None:
            return False
        inbox.put_nowait(message)
        return True

    def active(self, job_id: str) -> bool:
        return job_id in self._inboxes

    async def deliver(self, manifest: Manifest) -> None:
        """Return once the control plane accepted every file. Raises :class:`UploadFailed`."""
        inbox: asyncio.Queue[ResultMessage] = asyncio.Queue()
        self._inboxes[manifest.job_id] = inbox
        rejections = 0
        try:
            high = await asyncio.to_thread(self._record_files, manifest)
            why = "agent_restarted"  # only files an earlier run recorded have a high-water mark
            while True:
                generation = await self._uplink.wait_connected()
                attempt = _Attempt(self, manifest, inbox, high, why, generation)
                why = "session_lost"
                try:
                    rejections = await attempt.run(rejections)
                    return
                except _SessionLost:
                    log.info("result_upload_interrupted", job_id=manifest.job_id)
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

    async def _record_resends(self, job_id: str, ranges: list[tuple[str, int, int, str]]) -> None:
        if ranges and self._ledger is not None:
            await asyncio.to_thread(self._ledger.result_ranges_resent, job_id, ranges)


class _Attempt:
    """One session's try at delivering a manifest."""

    def __init__(
        self,
        uploader: Uploader,
        manifest: Manifest,
        inbox: asyncio.Queue[ResultMessage],
        high: list[int],
        why: str,
        generation: int,
    ) -> None:
        self._up = uploader
        self._manifest = manifest
        self._inbox = inbox
        self._job_id = manifest.job_id
        # Per file, the end of what any attempt of this delivery handed to the socket
        # (shared across attempts): bytes below it may have left already.
        self._high = high
        self._why = why
        self._generation = generation
        self._sent_to = [0] * len(manifest.files)
        self._acked = [0] * len(manifest.files)
        self._unacked = 0  # Σ sent_to - acked, kept as it changes (files may be many)

    async def run(self, rejections: int) -> int:
        await self._send(self._manifest.to_message())
        offsets = await self._resume_offsets()
        if offsets is None:  # the control plane already holds and accepted all of it
            log.info("results_already_accepted", job_id=self._job_id)
            return rejections
        for file, offset in zip(self._manifest.files, offsets, strict=True):
            self._acked[file.index] = self._sent_to[file.index] = offset
        await self._up._record_resends(
            self._job_id,
            [
                (f.path, o, min(self._high[f.index], f.size), self._why)
                for f, o in zip(self._manifest.files, offsets, strict=True)
                if o < min(self._high[f.index], f.size)
            ],
        )
        for file in self._manifest.files:
            await self._send_file(file, offsets[file.index])
        await self._send({"type": "result.end", "job_id": self._job_id})
        while True:
            message = await self._next()
            if isinstance(message, m.ResultAccepted):
                log.info("results_accepted", job_id=self._job_id, files=len(self._manifest.files))
                return rejections
            if isinstance(message, m.ResultRejected):
                rejections += 1
                log.warning(
                    "result_file_rejected",
                    job_id=self._job_id,
                    file=message.file,
                    code=message.code,
                    rejections=rejections,
                )
                if rejections >= MAX_REJECTIONS:
                    raise UploadFailed(f"results rejected {rejections} times")
                if 0 <= message.file < len(self._manifest.files):
                    file = self._manifest.files[message.file]
                    self._unacked -= self._sent_to[file.index] - self._acked[file.index]
                    self._acked[file.index] = self._sent_to[file.index] = 0
                    if self._high[file.index] > 0:
                        resent = (file.path, 0, self._high[file.index], "rejected")
                        await self._up._record_resends(self._job_id, [resent])
                    await self._send_file(file, 0)
                await self._send({"type": "result.end", "job_id": self._job_id})

    async def _resume_offsets(self) -> list[int] | None:
        """The offsets of ``result.resume``; None if ``result.accepted`` came instead."""
        while True:
            message = await self._next()
            if isinstance(message, m.ResultAccepted):
                return None
            if not isinstance(message, m.ResultResume):
                continue
            files = self._manifest.files
            if len(message.offsets) == len(files) and all(
                0 <= o <= f.size for o, f in zip(message.offsets, files, strict=True)
            ):
                return list(message.offsets)
            # Offsets that cannot be right for this manifest: start every file again.
            log.warning("result_resume_invalid", job_id=self._job_id, offsets=message.offsets[:8])
            return [0] * len(files)

    async def _send_file(self, file: ResultFile, offset: int) -> None:
        path = self._up._spool.file_path(self._job_id, file.index)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            while offset < file.size:
                n = min(MAX_CHUNK_PAYLOAD, file.size - offset)
                await self._wait_window(n)
                payload = os.pread(fd, n, offset)
                if len(payload) != n:
                    raise AgentError(f"spooled file {file.index} of {self._job_id} is short")
                header = {
                    "type": "result.chunk",
                    "job_id": self._job_id,
                    "file": file.index,
                    "offset": offset,
                }
                # Raised before the send: bytes of a send that fails may have left too.
                self._high[file.index] = max(self._high[file.index], offset + n)
                if not await self._up._uplink.send_binary(header, payload):
                    raise _SessionLost
                crash_point("upload.chunk_sent")
                offset += n
                self._sent_to[file.index] = offset
                self._unacked += n
        finally:
            os.close(fd)

    async def _wait_window(self, n: int) -> None:
        while self._unacked + n > WINDOW and self._unacked > 0:
            message = await self._next()
            if not isinstance(message, m.ResultAck):
                log.info("result_message_ignored", job_id=self._job_id, type=message.type)

    async def _next(self) -> ResultMessage:
        """The next message for this upload; acks are applied on the way."""
        if self._up._uplink.generation != self._generation:
            raise _SessionLost  # ended and replaced while no one was waiting on it
        lost = asyncio.ensure_future(self._up._uplink.wait_disconnected())
        get = asyncio.ensure_future(self._inbox.get())
        try:
            await asyncio.wait({lost, get}, return_when="FIRST_COMPLETED")
        finally:
            lost.cancel()
            if not get.done():
                get.cancel()
        if not get.done() or get.cancelled():
            raise _SessionLost
        message = get.result()
        if isinstance(message, m.ResultAck) and 0 <= message.file < len(self._acked):
            acked = max(self._acked[message.file], min(message.offset, self._sent_to[message.file]))
            self._unacked -= acked - self._acked[message.file]
            self._acked[message.file] = acked
        return message

    async def _send(self, message: dict[str, Any]) -> None:
        if not await self._up._uplink.send(message):
            raise _SessionLost
