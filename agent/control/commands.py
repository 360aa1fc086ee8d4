"""What the operator's commands do: ``drain``, ``undrain``, ``cancel JOB``, ``reconnect``
(and ``review ...``, handed to :mod:`agent.airlock.review`).

Each accepted command is recorded in the audit ledger (kind ``operator_action``: the
caller's uid and pid, the command, the job) before it takes effect: a command that
cannot be recorded is refused with ``not_recorded`` and changes nothing. Refusals of the
command itself (``unknown_job``, ``job_ended``, ``not_running``, ``unavailable``,
``bad_request``) change nothing and are not recorded.

The drained flag lives in ``<state_dir>/drained`` (present: drained), so a restart keeps
a drained node drained until ``undrain``. While drained, the job manager rejects new
assignments ``draining``; jobs already accepted run to their end.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any, Protocol

import structlog

from agent.airlock.review import REVIEW_COMMANDS, handle_review
from agent.audit import AuditLedger
from agent.config.models import ControlConfig
from agent.control.peer import Peer
from agent.control.server import ControlServer, ControlSocketError, Reply, error_reply
from agent.errors import AgentError
from agent.fsutil import fsync_dir, write_atomic
from agent.health.facts import NodeFacts
from agent.jobs.manager import JobManager
from agent.jobs.operator import CancelRefused, cancel_on_node

log = structlog.get_logger(__name__)

MAX_JOB_ID = 128
COMMANDS = ("drain", "undrain", "cancel", "reconnect")


class Redial(Protocol):
    def redial(self) -> None: ...


def drained_flag(state_dir: Path) -> Path:
    return state_dir / "drained"


def record_action(audit: AuditLedger, peer: Peer, command: str, job_id: str | None) -> None:
    """The typed ledger entry for an operator's command (kind ``operator_action``)."""
    audit.append("operator_action", job_id, uid=peer.uid, pid=peer.pid, command=command)


class Operator:
    """The control socket's handler. Construct it before the link starts: it reads the
    drained flag and applies it to ``manager`` and ``facts`` at once."""

    def __init__(
        self,
        state_dir: Path,
        manager: JobManager,
        audit: AuditLedger,
        facts: NodeFacts,
        link: Redial | None,
    ) -> None:
        self._flag = drained_flag(state_dir)
        self._manager = manager
        self._audit = audit
        self._facts = facts
        self._link = link
        self._set_draining(self._flag.exists())
        if manager.draining:
            log.warning("node_draining", why=f"{self._flag} exists (cloudbender-agent undrain)")

    def _set_draining(self, on: bool) -> None:
        self._manager.draining = on
        self._facts.draining = on

    async def __call__(self, peer: Peer, request: dict[str, Any]) -> Reply:
        command = request["command"]
        if command in REVIEW_COMMANDS:  # the airlock's (agent.airlock.review)
            return await handle_review(self._manager.airlock, peer, request)
        if command not in COMMANDS:
            return error_reply("bad_request", f"unknown command {command[:40]!r}")
        job_id = request.get("job_id")
        if command == "cancel":
            if not isinstance(job_id, str) or not 0 < len(job_id) <= MAX_JOB_ID:
                return error_reply("bad_request", "cancel needs a job id")
            try:
                runner = self._manager.cancellable(job_id)
            except CancelRefused as exc:
                return error_reply(exc.code, str(exc))
        elif job_id is not None:
            return error_reply("bad_request", f"{command} takes no job id")
        if command == "reconnect" and self._link is None:
            return error_reply("unavailable", "no control plane is configured")
        try:
            await asyncio.to_thread(record_action, self._audit, peer, command, job_id)
        except (AgentError, OSError) as exc:
            log.error("operator_action_not_recorded", command=command, error=str(exc))
            return error_reply("not_recorded", f"the audit ledger cannot record it: {exc}")
        log.info("operator_action", uid=peer.uid, pid=peer.pid, command=command, job_id=job_id)
        if command == "cancel":
            cancel_on_node(runner)
            return {"ok": True, "message": f"cancelling {job_id}: its container is being stopped"}
        return {"ok": True, "message": await self._do(command)}

    async def _do(self, command: str) -> str:
        if command == "drain":
            await asyncio.to_thread(self._write_flag)
            self._set_draining(True)
            running = self._manager.active()
            return f"draining: new jobs are rejected; {running} job(s) run to their end"
        if command == "undrain":
            await asyncio.to_thread(self._remove_flag)
            self._set_draining(False)
            return "accepting jobs again"
        assert self._link is not None
        self._link.redial()
        return "redialling the control plane now"

    def _write_flag(self) -> None:
        # Durable before the reply says "draining": a crash right after must not undo it.
        write_atomic(self._flag, b"drained by the operator (cloudbender-agent undrain to resume)\n")

    def _remove_flag(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._flag.unlink()
            fsync_dir(self._flag.parent)  # nor may a crash undo an undrain


RETRY_S = 30.0


async def serve_control(config: ControlConfig, operator: Operator) -> None:
    """Serve the control socket until cancelled; the daemon owns this task. A socket
    that cannot be set up is logged, not fatal: the node runs on without controls, and
    tries again every :data:`RETRY_S` (a passing ``EMFILE`` must not cost them for good)."""
    server = ControlServer(config.socket, config.group, operator)
    logged = None
    while True:
        try:
            await server.start()
            break
        except ControlSocketError as exc:
            if str(exc) != logged:  # once per distinct reason, not every retry
                # Under the unit the directory always exists; a missing one is an
                # agent started by hand, which then simply has no controls.
                level = log.warning if not config.socket.parent.is_dir() else log.error
                level("control_socket_unavailable", error=str(exc), retry_in_s=RETRY_S)
                logged = str(exc)
            await asyncio.sleep(RETRY_S)
    gid = server.group_gid
    log.info(
        "control_socket_listening",
        socket=str(config.socket),
        group=config.group if gid is not None else f"{config.group} (missing: root only)",
    )
    try:
        await asyncio.Event().wait()
    finally:
        await server.stop()
