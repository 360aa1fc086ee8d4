"""What the control channel's requests do to a running :class:`ControlPlane`.

One method per ``op`` of :mod:`agent.controlplane.control`'s wire format: ``submit``,
``jobs``, ``watch``, ``cancel``, ``results``, ``nodes``. Everything runs on the
server's event loop, the only one that touches the node table. Faults the caller
should see are raised as :class:`~agent.controlplane.errors.ControlPlaneError` and
become ``{"ok": false, "error": …}``; their words name what is wrong.

A job submitted here is remembered with its node, so that ``watch``, ``cancel`` and
``results`` need only the job id; a job this CP learnt of otherwise (an agent's
``hello.jobs``) is found by looking through the nodes.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from agent.controlplane.errors import ConditionTimeout, ControlPlaneError, NodeNotConnected
from agent.controlplane.jobfile import JobFile
from agent.controlplane.jobs import TERMINAL, JobTrack
from agent.controlplane.manifest import fs_name
from agent.controlplane.server import ControlPlane

# How long ``submit`` waits for job.accepted / job.rejected before saying "sent".
ANSWER_WAIT_S = 10.0
# The reference CP serves artifacts from memory: a bound on what one model may cost it.
MAX_MODEL_BYTES = 2 * 1024**3


def _text(request: dict[str, Any], key: str) -> str:
    value = request.get(key)
    if not isinstance(value, str) or not value:
        raise ControlPlaneError(f"bad request: {key} must be a non-empty string")
    return value


def _read_model(path: Path) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_MODEL_BYTES + 1)
    except OSError as exc:
        raise ControlPlaneError(f"model.file: cannot read {path}: {exc.strerror}") from exc
    if len(data) > MAX_MODEL_BYTES:
        raise ControlPlaneError(f"model.file: larger than {MAX_MODEL_BYTES} bytes")
    return data


def _state_of(track: JobTrack) -> dict[str, Any]:
    """Where a job stands: its terminal state, the furthest state, or its rejection."""
    if track.terminal is not None:
        end = track.terminal
        return {
            "state": end["state"],
            "reason": end.get("reason"),
            "exit_code": end.get("exit_code"),
        }
    if track.answers and track.answers[-1] != "accepted" and track.state is None:
        return {"state": "rejected", "reason": track.answers[-1]}
    return {"state": track.state or ("assigned" if track.assigns else "unknown")}


class Commands:
    """The operations of the control channel on ``cp``; :meth:`handle` is its handler."""

    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp
        self._node_of: dict[str, str] = {}  # job_id -> node_id, for jobs submitted here

    async def handle(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        op = request["op"]
        if op == "watch":
            async for line in self.watch(request):
                yield line
            return
        simple = {
            "submit": self.submit,
            "jobs": self.jobs,
            "cancel": self.cancel,
            "results": self.results,
            "nodes": self.nodes,
        }.get(op)
        if simple is None:
            raise ControlPlaneError(f"bad request: unknown op {op[:40]!r}")
        yield {"ok": True} | await simple(request)

    # -- finding a job ------------------------------------------------------------------

    def _find(self, request: dict[str, Any]) -> tuple[str, str]:
        """``(node_id, job_id)`` of the request's job. Raises ``ControlPlaneError``."""
        job_id = _text(request, "job_id")
        if isinstance(request.get("node"), str):
            node_id = request["node"]
        elif job_id in self._node_of:
            node_id = self._node_of[job_id]
        else:
            holders = [n for n, s in self.cp.nodes().items() if job_id in s.jobs]
            if len(holders) > 1:
                raise ControlPlaneError(f"{job_id} is known on {len(holders)} nodes; give --node")
            if not holders:
                raise ControlPlaneError(f"unknown job {job_id}")
            node_id = holders[0]
        node = self.cp.registry.get(node_id)
        if node is None or job_id not in node.jobs:
            raise ControlPlaneError(f"unknown job {job_id} on node {node_id}")
        return node_id, job_id

    def _track(self, node_id: str, job_id: str) -> JobTrack:
        node = self.cp.registry.get(node_id)
        assert node is not None
        return node.jobs[job_id]

    # -- the operations -------------------------------------------------------------------

    async def submit(self, request: dict[str, Any]) -> dict[str, Any]:
        """Register the model (if any), send ``job.assign``, wait a little for the answer."""
        node_id = _text(request, "node")
        try:
            job = JobFile.model_validate(request.get("job"))
        except ValidationError as exc:
            raise ControlPlaneError(f"bad request: job: {exc.error_count()} problems") from exc
        if job.job_id is None:
            raise ControlPlaneError("bad request: job.job_id is required here")
        if job.job_id in self._node_of or any(
            job.job_id in s.jobs for s in self.cp.nodes().values()
        ):
            raise ControlPlaneError(f"job_id {job.job_id} is already used")
        fields = job.assign_fields()
        if job.model is not None:
            fields["model"] = await self._register_model(job)
        node = self.cp.registry.get(node_id)
        after = len(node.messages) if node is not None else 0
        try:
            await self.cp.assign(node_id, job.job_id, job.image.ref, job.datastore, **fields)
        except NodeNotConnected as exc:
            raise ControlPlaneError(f"node {node_id} is not connected") from exc
        self._node_of[job.job_id] = node_id
        out: dict[str, Any] = {"job_id": job.job_id, "node": node_id, "model": fields.get("model")}
        return out | await self._answer(node_id, job.job_id, after)

    async def _register_model(self, job: JobFile) -> dict[str, Any]:
        assert job.model is not None
        data = await asyncio.to_thread(_read_model, Path(job.model.file))
        digest = hashlib.sha256(data).hexdigest()
        artifact_id = job.model.artifact or f"sha256-{digest[:32]}"
        held = self.cp.artifacts.get(artifact_id)
        # Another content under the same id would fail every job still fetching the old.
        if held is not None and held.sha256 != digest:
            raise ControlPlaneError(f"model.artifact: {artifact_id} already serves another file")
        await self.cp.add_artifact(artifact_id, data)
        return {"artifact": artifact_id, "sha256": digest, "size": len(data)}

    async def _answer(self, node_id: str, job_id: str, after: int) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            node = self.cp.registry.get(node_id)
            for entry in node.messages[after:] if node is not None else []:
                answers = entry.type in ("job.accepted", "job.rejected")
                if answers and entry.problem is None and entry.data.get("job_id") == job_id:
                    return entry.data
            return None

        try:
            answer = await self.cp.registry.wait_until(found, ANSWER_WAIT_S, lambda: "no answer")
        except ConditionTimeout:
            return {"answer": None}
        if answer["type"] == "job.accepted":
            return {"answer": "accepted"}
        return {"answer": "rejected", "code": answer.get("code"), "detail": answer.get("detail")}

    async def jobs(self, _request: dict[str, Any]) -> dict[str, Any]:
        """Every job of every node this CP knows of."""
        out = []
        for node_id, node in sorted(self.cp.nodes().items()):
            for job_id, track in node.jobs.items():
                out.append({"job_id": job_id, "node": node_id} | _state_of(track))
        return {"jobs": out}

    async def watch(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Each new state of the job as it arrives; the final line when it ends (or is
        rejected), or an error after ``timeout_s`` (absent: no limit)."""
        node_id, job_id = self._find(request)
        limit = request.get("timeout_s")
        deadline = None
        if isinstance(limit, (int, float)) and not isinstance(limit, bool):
            deadline = asyncio.get_running_loop().time() + float(limit)
        seen, last = 0, None
        while True:
            track = self._track(node_id, job_id)
            for message in track.states[seen:]:
                # After a reconnect the agent repeats the state it is in; once is enough.
                if message["state"] != last:
                    yield {"event": "state"} | _pick(message, "state", "reason", "exit_code", "ts")
                last = message["state"]
            seen = len(track.states)
            now = _state_of(track)
            if now["state"] in TERMINAL or now["state"] == "rejected":
                yield {"ok": True, "job_id": job_id, "node": node_id} | now
                return
            wait = 3600.0
            if deadline is not None:
                wait = deadline - asyncio.get_running_loop().time()
                if wait <= 0:
                    raise ControlPlaneError(f"{job_id} is still {now['state']} after {limit}s")

            answers = len(track.answers)

            def changed(
                track: JobTrack = track, seen: int = seen, answers: int = answers
            ) -> bool | None:
                return True if len(track.states) > seen or len(track.answers) > answers else None

            try:
                await self.cp.registry.wait_until(changed, wait, lambda: "")
            except ConditionTimeout:
                continue

    async def cancel(self, request: dict[str, Any]) -> dict[str, Any]:
        """Send ``job.cancel``, unless the job already ended (nothing would change)."""
        node_id, job_id = self._find(request)
        now = _state_of(self._track(node_id, job_id))
        if now["state"] in TERMINAL or now["state"] == "rejected":
            return {"job_id": job_id, "node": node_id, "sent": False} | now
        try:
            await self.cp.cancel(node_id, job_id)
        except NodeNotConnected as exc:
            raise ControlPlaneError(f"node {node_id} is not connected") from exc
        return {"job_id": job_id, "node": node_id, "sent": True} | now

    async def results(self, request: dict[str, Any]) -> dict[str, Any]:
        """Where the job's accepted results are, each with the size and sha256 verified."""
        node_id, job_id = self._find(request)
        state = self.cp.results_state(node_id, job_id)
        if not state.done:
            now = _state_of(self._track(node_id, job_id))["state"]
            raise ControlPlaneError(f"no accepted results for {job_id} (the job is {now})")
        manifest = state.manifests[-1]["files"]
        files = [
            _pick(f, "path", "size", "sha256") | {"stored": str(state.files[f["path"]])}
            for f in manifest
        ]
        where = self.cp.results_dir / fs_name(node_id) / fs_name(job_id)
        return {"job_id": job_id, "node": node_id, "dir": str(where.absolute()), "files": files}

    async def nodes(self, _request: dict[str, Any]) -> dict[str, Any]:
        """Each node that said hello: connected or not, and what its hello said."""
        out = []
        for node_id, node in sorted(self.cp.nodes().items()):
            hello = node.hello or {}
            inventory = hello.get("inventory") or {}
            out.append(
                {
                    "node_id": node_id,
                    "connected": node.connected,
                    "last_seen": node.last_seen,
                    "agent_version": hello.get("agent_version"),
                    "hostname": hello.get("hostname"),
                    "labels": hello.get("labels"),
                    "datastores": [d.get("name") for d in hello.get("datastores") or []],
                    "gpus": [g.get("name") for g in inventory.get("gpus") or []],
                    "cpus": (inventory.get("cpu") or {}).get("logical"),
                    "memory_total_mib": inventory.get("memory_total_mib"),
                    "capacity": hello.get("capacity"),
                }
            )
        return {"nodes": out}


def _pick(message: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: message[k] for k in keys if k in message}
