"""The reading, waiting, jobs and results half of :class:`ControlPlane`'s asyncio API.

A mixin, so that ``server.py`` keeps to the server: it reads the node table
(:class:`~agent.controlplane.state.Registry`) and the uploads
(:class:`~agent.controlplane.results.ResultStore`), and sends through
:meth:`ControlPlane.send`. Everything here runs on the server's event loop.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from agent.controlplane.assigncheck import assign_problems
from agent.controlplane.errors import BadAssignment
from agent.controlplane.jobs import TERMINAL, build_assign
from agent.controlplane.results import ResultStore
from agent.controlplane.state import Disconnect, NodeState, Registry
from agent.controlplane.upload import ResultFault, ResultsState


class ControlPlaneAPI:
    """Mixed into :class:`~agent.controlplane.server.ControlPlane`; not used alone."""

    registry: Registry
    results: ResultStore

    async def send(self, node_id: str, message: dict[str, Any]) -> None:
        raise NotImplementedError  # ControlPlane.send

    def nodes(self) -> dict[str, NodeState]:
        """A deep copy of every node's record, keyed by ``node_id``."""
        return self.registry.snapshot()

    def node(self, node_id: str) -> NodeState | None:
        """A deep copy of one node's record, or ``None`` if it never said hello."""
        return self.registry.snapshot_of(node_id)

    # The waits take a timeout (ASYNC109): the same signature as the blocking facade's.
    async def wait_for_node(self, node_id: str, timeout: float = 10.0) -> NodeState:  # noqa: ASYNC109
        """Wait until ``node_id`` has a welcomed, live session; return a snapshot of it.

        Raises :class:`~agent.controlplane.errors.ConditionTimeout`.
        """

        def found() -> NodeState | None:
            node = self.registry.get(node_id)
            return self.node(node_id) if node is not None and node.connected else None

        return await self.registry.wait_until(found, timeout, lambda: f"no session of {node_id}")

    async def wait_for_message(
        self,
        node_id: str,
        type_: str,
        predicate: Callable[[dict[str, Any]], bool] | None = None,
        timeout: float = 10.0,  # noqa: ASYNC109
        after_index: int = 0,
    ) -> dict[str, Any]:
        """The first well-formed ``type_`` message from ``node_id`` that ``predicate`` accepts.

        Only messages at position ``after_index`` or later in the node's log count:
        pass ``len(node.messages)`` from a snapshot to wait for a new one. Messages
        that the CP answered with an error never match. Raises ``ConditionTimeout``.
        """

        scanned = after_index  # the log only grows: each check reads only what is new

        def found() -> dict[str, Any] | None:
            nonlocal scanned
            node = self.registry.get(node_id)
            if node is None:
                return None
            messages = node.messages
            for position in range(scanned, len(messages)):
                entry = messages[position]
                if entry.type != type_ or entry.problem is not None:
                    continue
                if predicate is None or predicate(entry.data):
                    return copy.deepcopy(entry.data)
            scanned = max(scanned, len(messages))
            return None

        def describe() -> str:
            node = self.registry.get(node_id)
            seen = [m.type for m in node.messages[after_index:]] if node is not None else []
            return f"no {type_} from {node_id} (saw {seen[-20:]})"

        return await self.registry.wait_until(found, timeout, describe)

    async def wait_for_disconnect(self, node_id: str, timeout: float = 10.0) -> Disconnect:  # noqa: ASYNC109
        """Wait until ``node_id`` has no live session; how its last session ended."""

        def found() -> Disconnect | None:
            node = self.registry.get(node_id)
            if node is None or node.connected or not node.disconnects:
                return None
            return node.disconnects[-1]

        return await self.registry.wait_until(found, timeout, lambda: f"{node_id} still connected")

    # -- jobs (§4) ----------------------------------------------------------------------

    async def assign(
        self, node_id: str, job_id: str, image_ref: str, datastore: str, **fields: Any
    ) -> None:
        """Send ``job.assign``. ``fields`` go in as given (``command``, ``env``, ``gpus``,
        ``resources``, ``model``, ``timeout_s``, ``results``, anything), except ``image``,
        merged with ``{"ref": image_ref}`` (``image={"digest": …}``).

        The answer is not awaited: see :meth:`wait_for_message`. Raises ``BadAssignment``,
        sending nothing, for a job that breaks docs/protocol.md 1.1's id pattern or caps
        (to send one anyway, for a test, use :meth:`send`); ``NodeNotConnected``.
        """
        message = build_assign(job_id, image_ref, datastore, **fields)
        problems = assign_problems(message)
        if problems:
            raise BadAssignment(problems)
        await self.send(node_id, message)

    async def cancel(self, node_id: str, job_id: str) -> None:
        """Send ``job.cancel``. Raises ``NodeNotConnected``."""
        await self.send(node_id, {"type": "job.cancel", "job_id": job_id})

    async def ack(self, node_id: str, job_id: str) -> None:
        """Send ``job.ack`` (the CP recorded the job's end). Raises ``NodeNotConnected``."""
        await self.send(node_id, {"type": "job.ack", "job_id": job_id})

    def job_states(self, node_id: str, job_id: str) -> list[dict[str, Any]]:
        """Every well-formed ``job.state`` of ``job_id`` from ``node_id``, oldest first."""
        node = self.registry.get(node_id)
        track = node.jobs.get(job_id) if node is not None else None
        return copy.deepcopy(track.states) if track is not None else []

    async def wait_for_job(
        self,
        node_id: str,
        job_id: str,
        states: Collection[str] = TERMINAL,
        timeout: float = 10.0,  # noqa: ASYNC109
    ) -> dict[str, Any]:
        """The first ``job.state`` of ``job_id`` in one of ``states`` (default: terminal)."""
        wanted = frozenset(states)
        return await self.wait_for_message(
            node_id,
            "job.state",
            lambda m: m["job_id"] == job_id and m["state"] in wanted,
            timeout,
        )

    # -- results (§5) -------------------------------------------------------------------

    async def results_fault(
        self,
        job_id: str | None = None,
        *,
        stop_acking: bool = False,
        drop_after_bytes: int | None = None,
        reject_file_once: int | None = None,
        reject_always: int | None = None,
        hold_durable: threading.Event | None = None,
    ) -> ResultFault:
        """Arm test faults on ``job_id``'s results (``None``: every job), replacing earlier ones.

        ``stop_acking``: store and fsync, but send no ``result.ack`` (those held back
        are sent when a later call clears it). ``drop_after_bytes``: once that many
        payload bytes arrived, after storing the chunk that reached it, end the
        connection without a closing handshake; once. ``reject_file_once`` /
        ``reject_always``: at ``result.end``, reject that file (``checksum_mismatch``,
        its bytes forgotten) even if it is right; once / every time. ``hold_durable``:
        each durable point waits before its fdatasync until the event is set (and so
        does the ack it would send); the returned fault's ``durable_waiting`` is set
        once one waits.
        """
        fault = ResultFault(
            stop_acking, drop_after_bytes, reject_file_once, reject_always, hold_durable
        )
        await self.results.set_fault(job_id, fault)
        return fault

    def results_state(self, node_id: str, job_id: str) -> ResultsState:
        """A snapshot of ``job_id``'s results from ``node_id`` (all zero if none came)."""
        return self.results.state(node_id, job_id)

    def result_files(self, node_id: str, job_id: str) -> dict[str, Path]:
        """``path -> stored file`` of accepted results; empty until they are accepted."""
        return self.results.state(node_id, job_id).files

    async def wait_for_results(
        self,
        node_id: str,
        job_id: str,
        timeout: float = 10.0,  # noqa: ASYNC109
    ) -> ResultsState:
        """Wait until ``job_id``'s results from ``node_id`` are accepted.

        Raises ``ConditionTimeout``."""

        def found() -> ResultsState | None:
            accepted = self.results.accepted(node_id, job_id)
            return self.results.state(node_id, job_id) if accepted else None

        def describe() -> str:
            state = self.results.state(node_id, job_id)
            return f"results of {job_id} from {node_id} not accepted (held {list(state.held)})"

        return await self.registry.wait_until(found, timeout, describe)
