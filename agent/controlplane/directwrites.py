"""Direct (``O_DIRECT``) writes of bulk result bytes for the reference control plane.

The CP writes each result byte once and never reads it back, so for bulk bytes the page
cache only costs: filling it, writing it back and dropping it again cost the CP about
as much CPU as hashing the bytes (profiled for 1 GiB on the 2-core development VM), and
the disk takes direct writes faster than writeback gives them to it. A direct write
skips the cache, but the device needs block-aligned offsets, lengths and memory, so each
write is copied into one of :data:`BUFFERS` page-aligned buffers and written from it by
a thread of its own while the caller goes on; :meth:`DirectWrites.submit` waits only
while every buffer is in flight. One thread, so that writes reach the disk in the order
submitted: a CP killed meanwhile leaves each file a prefix of what it received, never
later bytes after a gap (a write in progress completes; a queued one never starts). A
second thread measured no faster on the 2-core development VM.

Durability does not change: a durable point waits for the direct writes before it, then
calls ``fdatasync`` on the file as for any other write, which also flushes the device's
write cache. Where a file system refuses ``O_DIRECT`` (``open`` says ``EINVAL``: ramfs,
some FUSE and network file systems), :class:`~agent.controlplane.resultfiles.JobFiles`
writes through the cache instead.
"""

from __future__ import annotations

import errno
import mmap
import os
import queue
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor

MIN_SIZE = 256 * 1024  # writes this large are worth going direct
ALIGN = 4096  # of a direct write's offset, length and buffer (covers any disk's block)
MAX_WRITE = 1024 * 1024  # the most one direct write moves: one chunk (§5)
BUFFERS = 4  # page-aligned buffers: while all are in flight, submit() waits


class DirectWrites:
    """The thread and the buffers of direct writes; :meth:`close` ends them."""

    def __init__(self) -> None:
        self._threads = ThreadPoolExecutor(1, thread_name_prefix="cp-results-io")
        self._free: queue.SimpleQueue[mmap.mmap] = queue.SimpleQueue()
        for _ in range(BUFFERS):
            self._free.put(mmap.mmap(-1, MAX_WRITE))
        self._closed = False

    def submit(self, fd: int, offset: int, data: memoryview) -> Future[None]:
        """Write ``data`` (whole blocks, at most :data:`MAX_WRITE` bytes) at ``offset``
        of ``fd``, an ``O_DIRECT`` descriptor that must stay open until the write is
        done; the future raises the write's ``OSError``."""
        if self._closed:
            raise RuntimeError("direct writes after close()")
        buffer = self._free.get()
        try:
            with memoryview(buffer) as view:
                view[: len(data)] = data
            return self._threads.submit(self._write, buffer, fd, offset, len(data))
        except BaseException:
            self._free.put(buffer)
            raise

    def _write(self, buffer: mmap.mmap, fd: int, offset: int, size: int) -> None:
        try:
            with memoryview(buffer) as view, view[:size] as data:
                done = os.pwrite(fd, data, offset)
        finally:
            self._free.put(buffer)
        if done != size:  # the disk filled mid-write; the next write would say ENOSPC
            raise OSError(errno.ENOSPC, f"direct write of {size} bytes wrote {done}")

    def close(self) -> None:
        """Wait for the writes in flight, then end the thread and free the buffers."""
        if self._closed:
            return
        self._closed = True
        self._threads.shutdown()
        for _ in range(BUFFERS):
            self._free.get().close()


def wait_all(writes: Iterable[Future[None]]) -> None:
    """Wait for every write, then raise the first one's ``OSError``, if any failed."""
    failed: BaseException | None = None
    for write in writes:
        error = write.exception()
        failed = failed or error
    if failed is not None:
        raise failed
