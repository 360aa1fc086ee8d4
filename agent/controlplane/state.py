"""What the reference control plane remembers about each node, and waiting on it.

Everything is recorded by the one event loop that runs the server; readers get deep
copies (:meth:`Registry.snapshot`), so a test can hold a :class:`NodeState` while
the server goes on. State outlives sessions and server restarts: a node that
reconnects after ``stop()`` / ``start()`` keeps its history.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from agent.controlplane import jobs
from agent.controlplane.errors import ConditionTimeout
from agent.controlplane.jobs import JobTrack

T = TypeVar("T")


@dataclass(frozen=True)
class RecordedFrame:
    """One frame from the agent that named a type, in arrival order.

    ``data`` is the text message, or the header of a binary frame (then ``payload``
    holds the bytes after it). ``problem`` is set when the CP answered it with an
    ``error``: such messages are kept for the record but never match a wait.
    """

    index: int
    type: str
    data: dict[str, Any]
    ts: float
    session: str
    payload: bytes | None = None
    problem: str | None = None


@dataclass(frozen=True)
class Heartbeat:
    seq: int
    ts: float
    received_at: float
    session: str


@dataclass(frozen=True)
class ArtifactRequest:
    """One ``artifact.get`` that passed the type checks, in arrival order."""

    artifact: str
    offset: int
    session: str


@dataclass(frozen=True)
class Disconnect:
    """How a session ended. ``by`` is ``agent``, ``cp`` or ``network`` (no close frame)."""

    session: str
    code: int | None
    reason: str
    by: str
    at: float


@dataclass
class NodeState:
    """Everything the CP has seen from one ``node_id``, across its sessions."""

    node_id: str
    hello: dict[str, Any] | None = None
    connected: bool = False
    session: str | None = None
    connected_at: float | None = None
    last_seen: float | None = None
    sessions: list[str] = field(default_factory=list)
    messages: list[RecordedFrame] = field(default_factory=list)
    heartbeats: list[Heartbeat] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    sent: list[dict[str, Any]] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    disconnects: list[Disconnect] = field(default_factory=list)
    artifact_requests: list[ArtifactRequest] = field(default_factory=list)
    jobs: dict[str, JobTrack] = field(default_factory=dict)

    def of_type(self, type_: str) -> list[dict[str, Any]]:
        """The well-formed messages of ``type_``, oldest first."""
        return [m.data for m in self.messages if m.type == type_ and m.problem is None]

    def artifact_offsets(self, artifact: str) -> list[int]:
        """The ``offset`` of every ``artifact.get`` for ``artifact``, oldest first."""
        return [r.offset for r in self.artifact_requests if r.artifact == artifact]


class Registry:
    """The node table plus a change signal that waiters sleep on.

    Not thread-safe: only the server's event loop may call the ``record_*`` methods.
    """

    def __init__(self) -> None:
        self._nodes: dict[str, NodeState] = {}
        self._changed: asyncio.Event | None = None
        self._changed_loop: asyncio.AbstractEventLoop | None = None

    def get(self, node_id: str) -> NodeState | None:
        """The live record (not a copy) of ``node_id``, if the CP has seen it."""
        return self._nodes.get(node_id)

    def snapshot(self) -> dict[str, NodeState]:
        return copy.deepcopy(self._nodes)

    def snapshot_of(self, node_id: str) -> NodeState | None:
        return copy.deepcopy(self._nodes.get(node_id))

    # -- recording (event loop only) ------------------------------------------------

    def opened(self, node_id: str, session: str, hello: dict[str, Any]) -> NodeState:
        node = self._nodes.setdefault(node_id, NodeState(node_id))
        now = time.time()
        node.hello, node.connected, node.session = hello, True, session
        node.connected_at = node.last_seen = now
        node.sessions.append(session)
        jobs.note_listed(node.jobs, hello.get("jobs"))
        self._touch()
        return node

    def closed(self, node_id: str, disconnect: Disconnect) -> None:
        node = self._nodes[node_id]
        node.disconnects.append(disconnect)
        # A replaced session ends after its successor opened: it must not mark the
        # node disconnected.
        if node.session == disconnect.session:
            node.connected = False
        self._touch()

    def received(
        self,
        node_id: str,
        session: str,
        type_: str,
        data: dict[str, Any],
        *,
        payload: bytes | None = None,
        problem: str | None = None,
    ) -> RecordedFrame:
        node = self._nodes[node_id]
        now = time.time()
        node.last_seen = now
        entry = RecordedFrame(len(node.messages), type_, data, now, session, payload, problem)
        node.messages.append(entry)
        if type_ == "error" and problem is None:
            node.errors.append(data)
        self._touch()
        return entry

    def heartbeat(self, node_id: str, session: str, seq: int, ts: float) -> None:
        self._nodes[node_id].heartbeats.append(Heartbeat(seq, ts, time.time(), session))
        self._touch()

    def artifact_request(self, node_id: str, request: ArtifactRequest) -> None:
        self._nodes[node_id].artifact_requests.append(request)
        self._touch()

    def violation(self, node_id: str, text: str) -> None:
        self._nodes[node_id].violations.append(text)
        self._touch()

    def sent(self, node_id: str, message: dict[str, Any]) -> None:
        node = self._nodes[node_id]
        node.sent.append(message)
        jobs.note_sent(node.jobs, message)
        self._touch()

    def sent_raw(self, node_id: str, data: str | bytes) -> None:
        """A frame sent as given: not logged in ``sent``, but a ``job.assign`` in it counts."""
        if isinstance(data, str):
            with contextlib.suppress(ValueError, RecursionError):
                # Leniently (NaN and all): an agent that understood it will answer it.
                jobs.note_sent(self._nodes[node_id].jobs, json.loads(data))
                self._touch()

    def track(self, node_id: str, job_id: str) -> JobTrack:
        """The live :class:`JobTrack` of ``job_id`` on ``node_id``, created if new."""
        return self._nodes[node_id].jobs.setdefault(job_id, JobTrack(job_id))

    def touch(self) -> None:
        """Wake the waiters: something they may look at changed (results, say)."""
        self._touch()

    # -- waiting ----------------------------------------------------------------------

    async def wait_until(
        self, found: Callable[[], T | None], within_s: float, describe: Callable[[], str]
    ) -> T:
        """Return ``found()`` as soon as it is not ``None``, re-checking after each change.

        Raises :class:`ConditionTimeout` with ``describe()`` when ``within_s`` seconds pass.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_s
        while True:
            result = found()
            if result is not None:
                return result
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise ConditionTimeout(f"{describe()} within {within_s:g}s")
            # The event belongs to one loop; a restarted threaded CP runs a new one.
            if self._changed is None or self._changed_loop is not loop:
                self._changed, self._changed_loop = asyncio.Event(), loop
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining)

    def _touch(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None
