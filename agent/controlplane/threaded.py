"""The reference control plane on its own event loop in a background thread.

For synchronous callers: tests that run the real agent as a subprocess, hypothesis
tests, a demo script. Same method names as :class:`ControlPlane`, blocking. Every
call runs on the server's loop (the node table is only ever touched there), and
every blocking call has a bound: ``timeout`` plus ``call_timeout_s`` at most.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import threading
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, TypeVar

from agent.controlplane.server import ControlPlane

T = TypeVar("T")


class ThreadedControlPlane:
    """A :class:`ControlPlane` served from a daemon thread, with a blocking facade.

    Takes :class:`ControlPlane`'s arguments, plus ``call_timeout_s``: the most any
    call may block beyond its own ``timeout``. :meth:`start` and :meth:`stop` are
    idempotent; a stopped instance can be started again, on the same port, with a
    new loop and thread. The underlying server is :attr:`cp`.
    """

    def __init__(self, *args: Any, call_timeout_s: float = 30.0, **kwargs: Any) -> None:
        self.cp = ControlPlane(*args, **kwargs)
        self._call_timeout_s = call_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        """Start the loop thread and listen. Raises ``OSError`` if the port is taken."""
        with self._lock:
            if self._thread is not None:
                return
            loop = asyncio.new_event_loop()
            thread = threading.Thread(
                target=_run_loop, args=(loop,), name="reference-control-plane", daemon=True
            )
            thread.start()
            self._loop, self._thread = loop, thread
            try:
                self._call(self.cp.start())
            except BaseException:
                self._shutdown_loop()
                raise

    def stop(self) -> None:
        """Close all sessions (1001), free the port, end the thread. Idempotent."""
        with self._lock:
            if self._thread is None:
                return
            try:
                self._call(self.cp.stop())
            finally:
                self._shutdown_loop()

    def __enter__(self) -> ThreadedControlPlane:
        self.start()
        return self

    def __exit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self.stop()

    def _shutdown_loop(self) -> None:
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(self._call_timeout_s)

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float = 0.0) -> T:
        loop = self._loop
        if loop is None:
            coro.close()
            raise RuntimeError("the control plane is not running; call start() first")
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        try:
            return future.result(timeout + self._call_timeout_s)
        except TimeoutError:
            future.cancel()
            raise

    def _on_loop(self, fn: Callable[[], T]) -> T:
        if self._loop is None:
            return fn()  # no loop, nothing runs concurrently

        async def call() -> T:
            return fn()

        return self._call(call())

    # -- the blocking API: every public method of ControlPlane --------------------------

    def __getattr__(self, name: str) -> Any:
        """``cp.<method>`` of :class:`ControlPlane`, blocking: a coroutine method runs on
        the loop and is awaited here for at most its ``timeout`` argument plus
        ``call_timeout_s``; a plain method runs on the loop too (the node table is only
        touched there); a property is read as it is. Derived, not mirrored by hand, so
        the facade cannot drift from the server's API."""
        if name.startswith("_"):
            raise AttributeError(name)
        attr = getattr(self.cp, name)
        if inspect.iscoroutinefunction(attr):
            return functools.partial(self._blocking, attr)
        if inspect.ismethod(attr):
            return functools.partial(self._read, attr)
        return attr

    def _blocking(self, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any, **kw: Any) -> T:
        bound = inspect.signature(fn).bind(*args, **kw)
        bound.apply_defaults()
        timeout = bound.arguments.get("timeout", 0.0)
        return self._call(fn(*args, **kw), float(timeout or 0.0))

    def _read(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        return self._on_loop(lambda: fn(*args, **kw))


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        try:
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()
