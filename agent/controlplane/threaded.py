"""The reference control plane on its own event loop in a background thread.

For synchronous callers: tests that run the real agent as a subprocess, hypothesis
tests, a demo script. Same method names as :class:`ControlPlane`, blocking. Every
call runs on the server's loop (the node table is only ever touched there), and
every blocking call has a bound: ``timeout`` plus ``call_timeout_s`` at most.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Collection, Coroutine
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from agent.controlplane.jobs import TERMINAL
from agent.controlplane.server import ControlPlane
from agent.controlplane.state import Disconnect, NodeState
from agent.controlplane.upload import ResultsState
from agent.protocol import MAX_CHUNK_PAYLOAD

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
    def url(self) -> str:
        return self.cp.url

    @property
    def port(self) -> int:
        return self.cp.port

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

    # -- the blocking API --------------------------------------------------------------

    def nodes(self) -> dict[str, NodeState]:
        return self._on_loop(self.cp.nodes)

    def node(self, node_id: str) -> NodeState | None:
        return self._on_loop(lambda: self.cp.node(node_id))

    def wait_for_node(self, node_id: str, timeout: float = 10.0) -> NodeState:
        return self._call(self.cp.wait_for_node(node_id, timeout), timeout)

    def wait_for_message(
        self,
        node_id: str,
        type_: str,
        predicate: Callable[[dict[str, Any]], bool] | None = None,
        timeout: float = 10.0,
        after_index: int = 0,
    ) -> dict[str, Any]:
        """As :meth:`ControlPlane.wait_for_message`; ``predicate`` runs on the CP's thread."""
        waiting = self.cp.wait_for_message(node_id, type_, predicate, timeout, after_index)
        return self._call(waiting, timeout)

    def wait_for_disconnect(self, node_id: str, timeout: float = 10.0) -> Disconnect:
        return self._call(self.cp.wait_for_disconnect(node_id, timeout), timeout)

    def send(self, node_id: str, message: dict[str, Any]) -> None:
        self._call(self.cp.send(node_id, message))

    def send_raw(self, node_id: str, data: str | bytes) -> None:
        self._call(self.cp.send_raw(node_id, data))

    def add_artifact(
        self, artifact_id: str, data: bytes, *, chunk_bytes: int = MAX_CHUNK_PAYLOAD
    ) -> str:
        return self._call(self.cp.add_artifact(artifact_id, data, chunk_bytes=chunk_bytes))

    def artifact_fault(
        self,
        artifact_id: str,
        *,
        drop_after_bytes: int | None = None,
        end_sha256: str | None = None,
        end_size: int | None = None,
    ) -> None:
        fault = self.cp.artifact_fault(
            artifact_id, drop_after_bytes=drop_after_bytes, end_sha256=end_sha256, end_size=end_size
        )
        self._call(fault)

    # -- jobs (§4) ----------------------------------------------------------------------

    def assign(
        self, node_id: str, job_id: str, image_ref: str, datastore: str, **fields: Any
    ) -> None:
        self._call(self.cp.assign(node_id, job_id, image_ref, datastore, **fields))

    def cancel(self, node_id: str, job_id: str) -> None:
        self._call(self.cp.cancel(node_id, job_id))

    def ack(self, node_id: str, job_id: str) -> None:
        self._call(self.cp.ack(node_id, job_id))

    def job_states(self, node_id: str, job_id: str) -> list[dict[str, Any]]:
        return self._on_loop(lambda: self.cp.job_states(node_id, job_id))

    def wait_for_job(
        self,
        node_id: str,
        job_id: str,
        states: Collection[str] = TERMINAL,
        timeout: float = 10.0,
    ) -> dict[str, Any]:
        return self._call(self.cp.wait_for_job(node_id, job_id, states, timeout), timeout)

    # -- results (§5) -------------------------------------------------------------------

    @property
    def results_dir(self) -> Path:
        return self.cp.results_dir

    def results_fault(
        self,
        job_id: str | None = None,
        *,
        stop_acking: bool = False,
        drop_after_bytes: int | None = None,
        reject_file_once: int | None = None,
        reject_always: int | None = None,
    ) -> None:
        fault = self.cp.results_fault(
            job_id,
            stop_acking=stop_acking,
            drop_after_bytes=drop_after_bytes,
            reject_file_once=reject_file_once,
            reject_always=reject_always,
        )
        self._call(fault)

    def results_state(self, node_id: str, job_id: str) -> ResultsState:
        return self._on_loop(lambda: self.cp.results_state(node_id, job_id))

    def result_files(self, node_id: str, job_id: str) -> dict[str, Path]:
        return self._on_loop(lambda: self.cp.result_files(node_id, job_id))

    def wait_for_results(self, node_id: str, job_id: str, timeout: float = 10.0) -> ResultsState:
        return self._call(self.cp.wait_for_results(node_id, job_id, timeout), timeout)

    # -- connections --------------------------------------------------------------------

    def close_node(self, node_id: str, code: int = 1000, reason: str = "") -> None:
        self._call(self.cp.close_node(node_id, code, reason))

    def disconnect_all(self, code: int = 1001, reason: str = "disconnect") -> None:
        self._call(self.cp.disconnect_all(code, reason))


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
