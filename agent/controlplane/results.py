"""Receiving results (docs/protocol.md §5): manifest → resume → chunks → acks → end → verdict.

:class:`ResultStore` holds one upload per ``(node_id, job_id)`` across sessions; the
bytes go to disk through :class:`~agent.controlplane.resultfiles.JobFiles`. Only the
server's event loop may call it. Choices where docs/protocol.md is silent:

- ``result.resume`` offers what is held of each file: what was written before the
  previous session ended, fsynced first. A manifest unlike the earlier one for the
  same job is a violation, and its upload starts over from 0.
- A chunk must continue its file exactly (``offset`` = bytes held), stay within the
  file's size, carry at most 1 MiB and come from the session of the latest manifest;
  otherwise it is answered ``error`` / ``bad_message`` and not stored. A chunk for a
  later file while an earlier one is incomplete is stored, and recorded as a violation.
- Payloads are hashed and written off the event loop, in one worker thread shared by
  every upload, in the order received (so each file's bytes are in order). A durable
  point (``fdatasync``, see :meth:`JobFiles.durable`) follows every
  :data:`ACK_EVERY_BYTES` received, the last byte of the last file and ``result.end``;
  ``result.ack`` is sent only once the durable point covering its bytes has returned,
  cumulative across files as revision 1.1 allows (:mod:`~agent.controlplane.resultacks`):
  one ack per durable point, however many files it covers.
- ``result.end`` rejects the first file (by index) whose size or sha256 is wrong, and
  forgets that file's bytes. Accepted results stay accepted: a manifest equal to theirs,
  or a ``result.end``, gets ``result.accepted`` again; another manifest for them is
  ``bad_message``.
- ``result.chunk`` / ``result.end`` for a job without a manifest: ``bad_message``.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any, Protocol

import structlog
from websockets.exceptions import ConnectionClosed

from agent.controlplane.manifest import parse
from agent.controlplane.resultacks import AckPlan
from agent.controlplane.resultfiles import JobFiles
from agent.controlplane.resultworker import ResultWorker
from agent.controlplane.state import Registry
from agent.controlplane.upload import ResultFault, ResultsState, Upload
from agent.protocol import MAX_CHUNK_PAYLOAD

ACK_EVERY_BYTES = 4 * 1024 * 1024

log = structlog.get_logger(__name__)


class ResultContext(Protocol):
    """What the result handlers need of the session a message came in."""

    node_id: str
    session_id: str

    async def send(self, message: dict[str, Any]) -> None: ...

    async def abort(self) -> None:
        """End the connection without a closing handshake (a test fault)."""


def _bad_message(detail: str, ref: str) -> dict[str, Any]:
    return {"type": "error", "code": "bad_message", "detail": detail, "ref": ref}


class ResultStore:
    """Every upload, by ``(node_id, job_id)``, and the faults armed for tests."""

    def __init__(self, root: Path, registry: Registry, ack_every: int = ACK_EVERY_BYTES) -> None:
        self.root = root
        self._registry = registry
        self.ack_every = ack_every
        self._uploads: dict[tuple[str, str], Upload] = {}
        self._faults: dict[str | None, ResultFault] = {}
        self._no_fault = ResultFault()  # never armed, so never changed: one for all chunks
        self._worker = ResultWorker()
        self._submit = self._worker.run

    def _upload(self, node_id: str, job_id: str) -> Upload:
        key = (node_id, job_id)
        if key not in self._uploads:
            self._uploads[key] = Upload(node_id, job_id, JobFiles(self.root, node_id, job_id))
        return self._uploads[key]

    def _fault(self, job_id: str) -> ResultFault:
        return self._faults.get(job_id) or self._faults.get(None) or self._no_fault

    def state(self, node_id: str, job_id: str) -> ResultsState:
        upload = self._uploads.get((node_id, job_id))
        return upload.snapshot() if upload is not None else ResultsState(node_id, job_id)

    def accepted(self, node_id: str, job_id: str) -> bool:
        upload = self._uploads.get((node_id, job_id))
        return upload is not None and upload.final is not None

    async def set_fault(self, job_id: str | None, fault: ResultFault) -> None:
        """Arm ``fault`` for ``job_id`` (``None``: every job without its own), replacing any.

        When acks are no longer stopped, the acks held back are sent at once to the
        session of each matching upload, if it is still open.
        """
        self._faults[job_id] = fault
        if fault.stop_acking:
            return
        for upload in list(self._uploads.values()):
            if job_id in (None, upload.job_id) and upload.ctx is not None:
                # Durable points queued before now: what they cover is held back too.
                await asyncio.gather(*upload.ack_tasks)
                # The session may have ended meanwhile: its next manifest's resume
                # offsets then say what is held.
                with contextlib.suppress(ConnectionClosed):
                    await self._send_acks(upload, upload.ctx)

    def close(self) -> None:
        """Close every open partial file, once what was queued is written; uploads go on
        after a reopen. Blocks until the worker is idle."""
        self._worker.close(self._close_files)
        for upload in self._uploads.values():
            for task in upload.ack_tasks:
                task.cancel()

    def _close_files(self) -> None:
        for upload in self._uploads.values():
            try:
                upload.files.close()
            except OSError as exc:  # its bytes were never acked; every other upload closes
                log.error("cp.results_not_durable", job_id=upload.job_id, error=str(exc))

    async def _refuse(self, ctx: ResultContext, ref: str, detail: str) -> None:
        self._registry.violation(ctx.node_id, f"{ref}: answered bad_message: {detail}")
        await ctx.send(_bad_message(detail, ref))

    async def _send_acks(self, upload: Upload, ctx: ResultContext) -> None:
        """Send what the plan says the durable bytes now allow. ``upload.durable`` must
        hold only offsets a durable point has covered."""
        async with upload.ack_lock:  # planned and sent in one order
            if upload.plan is None:
                return
            for index, offset in upload.plan.advance(upload.durable):
                await self._ack(upload, ctx, index, offset)

    async def _ack(self, upload: Upload, ctx: ResultContext, index: int, offset: int) -> None:
        await ctx.send(
            {"type": "result.ack", "job_id": upload.job_id, "file": index, "offset": offset}
        )
        upload.acks.append((index, offset))  # recorded once it went out
        self._registry.touch()

    def _durable_point(self, upload: Upload, ctx: ResultContext) -> None:
        """Queue a durable point after the writes queued so far; ack once it returns.

        Not awaited: the session goes on reading while the worker writes and syncs.
        """
        covered, attempt = list(upload.written), upload.attempt
        fault = self._fault(upload.job_id)
        synced = self._worker.durable(upload, fault)
        # Decided now, as the bytes it covers are counted: the ack this point would send.
        withheld = fault.stop_acking
        if withheld:
            upload.withheld += 1

        async def ack() -> None:
            try:
                await synced
            except OSError as exc:  # nothing is acknowledged; result.end reports it
                log.error("cp.results_not_durable", job_id=upload.job_id, error=str(exc))
                return
            if upload.attempt != attempt:  # a newer manifest: its resume said what is held
                return
            upload.durable = covered
            if withheld:
                return
            with contextlib.suppress(ConnectionClosed):  # the next resume says it instead
                await self._send_acks(upload, ctx)

        task = asyncio.create_task(ack())
        upload.ack_tasks.add(task)
        task.add_done_callback(upload.ack_tasks.discard)

    # -- handlers --------------------------------------------------------------------------

    async def on_manifest(self, ctx: ResultContext, message: dict[str, Any]) -> None:
        manifest = parse(message)
        if isinstance(manifest, str):
            await self._refuse(ctx, "result.manifest", manifest)
            return
        upload = self._upload(ctx.node_id, manifest.job_id)
        # Kept as parsed, not copied (10,000 entries cost 11 µs each to deep-copy): the
        # dict is this frame's own, no one changes it, and snapshots copy what they show.
        upload.manifests.append(message)
        self._registry.touch()
        upload.attempt += 1  # acks still planned for an earlier session are void
        if upload.manifest is None:
            await self._submit(upload.recover, manifest)
        if upload.final is not None:
            if upload.manifest != manifest:
                detail = f"the results of {manifest.job_id} were accepted with another manifest"
                await self._refuse(ctx, "result.manifest", detail)
                return
            upload.accepted += 1
            await ctx.send({"type": "result.accepted", "job_id": manifest.job_id})
            return
        if upload.manifest != manifest:
            if upload.manifest is not None:
                self._registry.violation(
                    ctx.node_id,
                    f"result.manifest: {manifest.job_id}: unlike the earlier one; starting over",
                )
            await self._submit(upload.begin, manifest)
        await self._worker.durable(upload)
        upload.durable = list(upload.written)
        upload.plan = AckPlan([entry.size for entry in manifest.files], upload.written)
        upload.ctx, upload.sent, upload.unsynced = ctx, 0, 0
        upload.resumes.append(tuple(upload.written))
        resume = {"type": "result.resume", "job_id": manifest.job_id}
        await ctx.send(resume | {"offsets": list(upload.written)})

    async def on_chunk(
        self, ctx: ResultContext, header: dict[str, Any], payload: bytes | memoryview
    ) -> None:
        job_id, index, offset = header["job_id"], header["file"], header["offset"]
        upload = self._uploads.get((ctx.node_id, job_id))
        if upload is not None:
            upload.chunks += 1
            upload.wire_bytes += len(payload)
            self._registry.touch()
        problem = self._chunk_problem(ctx, upload, index, offset, len(payload))
        if problem is not None:
            await self._refuse(ctx, "result.chunk", problem)
            return
        assert upload is not None
        assert upload.manifest is not None
        entry = upload.manifest.files[index]
        # Files arrive in index order, so the one before must be complete (by induction,
        # all before it are); checking them all would cost O(files) per chunk.
        earlier = upload.manifest.files[index - 1] if index > 0 else None
        if earlier is not None and upload.written[index - 1] < earlier.size:
            self._registry.violation(
                ctx.node_id, f"result.chunk: {job_id}: file {index} before an earlier file ended"
            )
        last = upload.written[index] + len(payload) == entry.size
        self._worker.store(upload, index, offset, payload, last)
        upload.written[index] += len(payload)
        upload.sent += len(payload)
        assert upload.plan is not None
        upload.max_unacked = max(upload.max_unacked, upload.sent - upload.plan.acked_total)
        fault = self._fault(job_id)
        if fault.drop_after_bytes is not None:
            fault.received += len(payload)
            if fault.received >= fault.drop_after_bytes:
                fault.drop_after_bytes = None
                upload.drops += 1
                await ctx.abort()
                return
        upload.unsynced += len(payload)
        last_byte = index == len(upload.manifest.files) - 1 and upload.written[index] == entry.size
        if upload.unsynced >= self.ack_every or last_byte:
            upload.unsynced = 0
            self._durable_point(upload, ctx)

    def _chunk_problem(
        self, ctx: ResultContext, upload: Upload | None, index: int, offset: int, size: int
    ) -> str | None:
        if upload is None or upload.manifest is None:
            return "no result.manifest for this job"
        if upload.final is not None:
            return "the results of this job were already accepted"
        if upload.ctx is None or upload.ctx.session_id != ctx.session_id:
            return "no result.manifest for this job in this session"
        if not 0 <= index < len(upload.manifest.files):
            return f"file {index} is not in the manifest"
        if size > MAX_CHUNK_PAYLOAD:
            return f"payload of {size} bytes is over {MAX_CHUNK_PAYLOAD}"
        if offset != upload.written[index]:
            return f"offset {offset} of file {index}, expected {upload.written[index]}"
        if offset + size > upload.manifest.files[index].size:
            return f"file {index} would be longer than its size in the manifest"
        return None

    async def on_end(self, ctx: ResultContext, message: dict[str, Any]) -> None:
        job_id = message["job_id"]
        upload = self._uploads.get((ctx.node_id, job_id))
        if upload is None or upload.manifest is None:
            await self._refuse(ctx, "result.end", "no result.manifest for this job")
            return
        upload.ends += 1
        self._registry.touch()
        if upload.final is not None:
            upload.accepted += 1
            await ctx.send({"type": "result.accepted", "job_id": job_id})
            return
        if upload.ctx is None or upload.ctx.session_id != ctx.session_id:
            await self._refuse(ctx, "result.end", "no result.manifest for this job in this session")
            return
        await self._worker.durable(upload)  # after every write queued: digests done
        await asyncio.gather(*upload.ack_tasks)
        upload.unsynced = 0
        upload.durable = list(upload.written)
        fault = self._fault(job_id)
        if not fault.stop_acking:
            await self._send_acks(upload, ctx)
        verdict = upload.first_bad()
        forced = fault.reject_always if fault.reject_always is not None else fault.reject_file_once
        in_range = forced is not None and 0 <= forced < len(upload.manifest.files)
        if forced is not None and in_range and (verdict is None or forced < verdict[0]):
            verdict = (forced, "checksum_mismatch")
            if fault.reject_always is None:
                fault.reject_file_once = None
        if verdict is not None:
            index, code = verdict
            await self._submit(upload.forget, index)
            assert upload.plan is not None
            upload.plan.reject(index)
            upload.rejected.append(verdict)
            self._registry.touch()
            rejected = {"type": "result.rejected", "job_id": job_id, "file": index, "code": code}
            await ctx.send(rejected)
            return
        upload.final = await self._submit(upload.files.finish, upload.manifest)
        upload.accepted += 1
        self._registry.touch()
        await ctx.send({"type": "result.accepted", "job_id": job_id})
