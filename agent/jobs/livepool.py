"""A thread pool whose size follows a live setting.

The job runners wait for their containers on threads of one pool sized to the job
slots (``limits.max_concurrent_jobs`` + 1). A SIGHUP may raise the slots; a pool
sized once at start would then leave the extra jobs queued behind the others'
waits, noticing their containers' ends late. :class:`LivePool` reads the size at
each submit and only ever grows (threads are started on demand, and shrinking a
pool with waits in flight would strand them).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class LivePool(ThreadPoolExecutor):
    """A :class:`ThreadPoolExecutor` of at least ``size()`` workers, read per submit."""

    def __init__(self, size: Callable[[], int], thread_name_prefix: str) -> None:
        super().__init__(max_workers=max(size(), 1), thread_name_prefix=thread_name_prefix)
        self._size = size

    @property
    def max_workers(self) -> int:
        return self._max_workers

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        # ``_max_workers`` is what ThreadPoolExecutor._adjust_thread_count compares the
        # thread count against when a task is queued (CPython 3.8 and later); raising it
        # before the queueing lets the pool start the thread this task needs.
        self._max_workers = max(self._max_workers, self._size())
        return super().submit(fn, *args, **kwargs)
