"""The thread that hashes and writes every upload's result bytes (§5), and those beside it.

:class:`ResultWorker` runs blocking file work off the server's event loop, in the order
it was handed over, so that each file's bytes reach the disk in order and a durable
point covers every write queued before it. Only the event loop may call it.

Chunks are handed over in batches (:data:`BATCH_BYTES` or :data:`BATCH_OPS`, whichever
comes first) rather than one by one: a hand-over costs a lock, a queue and a thread
wake-up, which for 10,000 files of 1 KiB cost more than the writing. A 1 MiB chunk is a
batch of its own. Every other call (:meth:`ResultWorker.run`) first hands over the
batch being gathered, so order is kept; the caller must therefore queue a durable point
(or any other call) before it waits for the bytes of the chunks it queued.

Bulk bytes are written straight to the disk by the threads of
:class:`~agent.controlplane.directwrites.DirectWrites` while the worker hashes them and
goes on. A durable point (:meth:`ResultWorker.durable`) is taken in the worker, in order,
and synced in a second thread, once the direct writes before it are done, while the
worker goes on. A write or sync that fails does not stop the batch: the first
``OSError`` of an upload is kept on it and raised by every later durable point, so that
no ack covers bytes that were not written, nor bytes whose sync failed (Linux reports a
failed writeback once; the next ``fdatasync`` succeeds although those pages may be lost).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from agent.controlplane.directwrites import DirectWrites

if TYPE_CHECKING:
    from agent.controlplane.upload import ResultFault, Upload

BATCH_BYTES = 1024 * 1024
BATCH_OPS = 256
T = TypeVar("T")
_Store = tuple["Upload", int, int, "bytes | memoryview", bool]


class ResultWorker:
    """One worker thread, and one that syncs behind it, started on first use;
    :meth:`close` ends them (a reopen starts others)."""

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._syncer: ThreadPoolExecutor | None = None
        self._direct: DirectWrites | None = None
        self._batch: list[_Store] = []
        self._batch_bytes = 0

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="cp-results")
            self._direct = DirectWrites()
        return self._executor

    def durable(self, upload: Upload, fault: ResultFault | None = None) -> asyncio.Future[None]:
        """A durable point of ``upload`` after everything handed over before it: done once
        those bytes are durable; raises the ``OSError`` of a failed write or sync.

        The worker only takes what is to be synced (:meth:`JobFiles.start_durable`); the
        ``fdatasync`` calls run in a second thread, in order, while the worker goes on
        hashing and writing what came after: for 1 GiB on disk the worker used to sit
        idle in them for about a third of the upload."""
        if self._syncer is None:
            self._syncer = ThreadPoolExecutor(1, thread_name_prefix="cp-results-sync")
        begun = self.run(_start_durable, upload, fault, self._syncer)

        async def synced() -> None:
            await asyncio.wrap_future(await begun)

        return asyncio.ensure_future(synced())

    def run(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Run ``fn(*args)`` in the worker after everything handed over before it."""
        self._hand_over()
        return asyncio.wrap_future(self._pool().submit(fn, *args))

    def store(
        self, upload: Upload, index: int, offset: int, payload: bytes | memoryview, last: bool
    ) -> None:
        """Queue: hash and write ``payload`` at ``offset`` of file ``index`` (``last``: the
        file is then complete). ``payload`` must not change until a later :meth:`run`
        returns (a view of a received frame never does)."""
        self._batch.append((upload, index, offset, payload, last))
        self._batch_bytes += len(payload)
        if self._batch_bytes >= BATCH_BYTES or len(self._batch) >= BATCH_OPS:
            self._hand_over()

    def _hand_over(self) -> None:
        if self._batch:
            batch, self._batch, self._batch_bytes = self._batch, [], 0
            self._pool().submit(_store_all, batch, self._direct)  # errors are kept on the upload

    def close(self, last: Callable[[], None]) -> None:
        """Run ``last`` once everything queued is done, then end the thread. Blocks."""
        self._hand_over()
        executor, self._executor = self._executor, None
        syncer, self._syncer = self._syncer, None
        direct, self._direct = self._direct, None
        try:
            if executor is not None:
                executor.submit(lambda: None).result()  # every durable point is handed over
            if syncer is not None:
                syncer.shutdown()  # and synced, before ``last``
            if executor is not None:
                executor.submit(last).result()
        finally:
            if executor is not None:
                executor.shutdown()
            if direct is not None:
                direct.close()  # after last: every file is closed, every write done


def _store_all(batch: list[_Store], direct: DirectWrites | None) -> None:
    """In the worker: write (or hand over) and hash each chunk (hashlib and pwrite
    release the GIL)."""
    for upload, index, offset, payload, last in batch:
        if upload.store_error is not None:
            continue  # the upload's bytes are already wrong; durable() says so
        try:
            upload.files.write(index, offset, payload, direct)
            if last:
                upload.files.complete(index)
        except OSError as exc:
            upload.store_error = exc
            continue
        upload.digests[index].update(payload)


def _start_durable(
    upload: Upload, fault: ResultFault | None, syncer: ThreadPoolExecutor
) -> Future[None]:
    """In the worker: a durable point of ``upload``, held first while a test's
    ``hold_durable`` is. Raises the ``OSError`` of a failed write; a failed sync is kept
    on the upload like one, so that no later point reports those bytes durable."""
    if fault is not None and fault.hold_durable is not None:
        fault.durable_waiting.set()
        fault.hold_durable.wait()
    if upload.store_error is not None:
        raise upload.store_error
    sync = upload.files.start_durable()

    def run() -> None:
        failed = upload.store_error
        try:
            sync()  # also when it failed already: it closes what it took
        except OSError as exc:
            upload.store_error = upload.store_error or exc
            raise
        if failed is not None:
            raise failed

    return syncer.submit(run)
