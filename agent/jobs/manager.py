"""The job manager: what the control plane says about jobs (docs/protocol.md §4).

It answers ``job.assign`` (idempotent; admission policy; slots), ``job.cancel`` and
``job.ack``; runs one :class:`~agent.jobs.runner.JobRunner` task per job; and is the one
place a job changes state (:meth:`JobManager._transition`): the store first, then
``job.state`` to the control plane when a session is up. After every ``welcome`` it
sends the current state of every job listed in ``hello.jobs``.

Slots: a job holds one of ``limits.max_concurrent_jobs`` slots from acceptance until it
ends; an assignment when every slot is held is rejected ``no_capacity``, and so is one
while :func:`ack_backlog` ended jobs wait for their ``job.ack``. A job with a
slot whose GPUs are leased to other jobs is ``waiting``. (docs/protocol.md names both; this
is how the agent reads them, documented in docs/control-plane.md.)
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Callable
from typing import Any

import structlog

from agent.audit import AuditLedger
from agent.config import Config
from agent.errors import AgentError
from agent.gpu.base import GpuInventory
from agent.jobs.admission import Admitted, Rejected, admit, node_refusal
from agent.jobs.context import Resume, RunnerContext
from agent.jobs.model import ORDER, State, check_transition
from agent.jobs.operator import cancellable
from agent.jobs.runner import JobRunner
from agent.jobs.store import JobRecord, JobStore
from agent.jobs.tally import JobTally
from agent.link import Uplink
from agent.loops import until_done
from agent.protocol import messages
from agent.runtime.base import ContainerState

log = structlog.get_logger(__name__)

NOT_RECORDED = "job_end_not_recorded"


class JobManager:
    """Every job of this node from assignment to ``job.ack``; see the module doc. The
    job list it keeps is the unacknowledged jobs; the store has the rest."""

    def __init__(
        self,
        *,
        config: Callable[[], Config],
        store: JobStore,
        ctx: RunnerContext,
        uplink: Uplink,
        node_cpus: Callable[[], int],
        gpu_support: Callable[[], bool],
        gpus: Callable[[], GpuInventory | None],
        audit: AuditLedger | None = None,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self._config = config
        self._store = store
        self._ctx = ctx
        self.uplink = uplink
        self._node_cpus = node_cpus
        self._gpu_support = gpu_support
        self._gpus = gpus
        self._audit = audit
        self._records: dict[str, JobRecord] = {r.job_id: r for r in store.unacknowledged()}
        self._from_store = frozenset(self._records)
        self._runners: dict[str, JobRunner] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.tally = JobTally(lambda: uplink.payload_bytes_sent)
        # Called after every change of the job list, for /status and metrics.
        self._on_change = on_change
        self.draining = False  # the operator's drain: new assignments rejected draining
        self.airlock = ctx.airlock  # held results and their review (agent.control)

    # -- what the control plane says (through agent.dispatch) --------------------------

    def hello_jobs(self) -> list[dict[str, str]]:
        return [{"job_id": r.job_id, "state": r.state.value} for r in self._records.values()]

    async def session_started(self) -> None:
        """After every ``welcome``: the current state of every job (§3, ``hello.jobs``)."""
        for record in list(self._records.values()):
            await self._send_state(record)

    async def on_job_message(
        self, message: messages.JobAssign | messages.JobCancel | messages.JobAck
    ) -> None:
        if isinstance(message, messages.JobAssign):
            await self._assign(message)
        elif isinstance(message, messages.JobCancel):
            await self._cancel(message.job_id)
        else:
            await self._ack(message.job_id)

    async def reject_invalid(self, job_id: str, detail: str) -> None:
        """An assignment the session could not validate: ``bad_spec`` with the reason."""
        await self.uplink.send(messages.job_rejected(job_id, "bad_spec", detail))

    # -- assign / cancel / ack ----------------------------------------------------------

    async def _assign(self, assign: messages.JobAssign) -> None:
        job_id = assign.job_id
        known = self._records.get(job_id) or self._store.get(job_id)
        if known is not None:
            if known.state.terminal:
                await self._reject(job_id, "duplicate_job", f"job {job_id} has already ended")
            else:  # a repeat: the job exists, nothing more to start
                await self.uplink.send(messages.job_accepted(job_id))
            return
        if self.draining:  # after the repeat check: an accepted job's repeat stays accepted
            await self._reject(job_id, "draining", "the node's operator stopped new work")
            return
        config = self._config()
        decision = admit(
            assign,
            config,
            node_cpus=self._node_cpus(),
            gpus=self._gpus(),
            gpu_support=self._gpu_support(),
        )
        if isinstance(decision, Rejected):
            await self._reject(job_id, decision.code, decision.detail)
            return
        refusal = node_refusal(
            config.limits,
            active=self.active(),
            ended_unacked=self.unacknowledged_ended(),
            free_mib=self._free_mib(),
            engine_up=self._ctx.engine is None or self._ctx.engine.up,
        )
        if refusal is not None:
            await self._reject(job_id, refusal.code, refusal.detail)
            return
        now = time.time()
        # What a restart needs to re-admit the job, and nothing more: never image.auth;
        # unknown fields were dropped by the model, and 1.1's caps bound the rest.
        assignment = assign.model_dump(exclude={"image": {"auth"}}, exclude_none=True)
        record = JobRecord(job_id, State.ACCEPTED, assignment, created_at=now, updated_at=now)
        try:
            self._store.insert(record)
        except AgentError as exc:
            log.error("job_store_failed", job_id=job_id, error=str(exc))
            await self._reject(job_id, "no_space", "the node cannot record the job")
            return
        self._records[job_id] = record
        self._changed()
        if self._audit is not None:
            self._audit.job_assigned(
                job_id,
                assign.image.ref,
                assign.image.digest,
                assign.model.sha256 if assign.model else None,
                assign.datastore,
            )
        log.info("job_accepted", job_id=job_id, image=assign.image.ref, datastore=assign.datastore)
        await self.uplink.send(messages.job_accepted(job_id))
        await self._send_state(record)
        self._start(decision)

    async def _reject(self, job_id: str, code: str, detail: str) -> None:
        log.info("job_rejected", job_id=job_id, code=code, detail=detail)
        await self.uplink.send(messages.job_rejected(job_id, code, detail))

    def _start(self, job: Admitted, resume: Resume | None = None) -> None:
        runner = JobRunner(self._ctx, job, lambda s, r, e: self._transition(job.job_id, s, r, e))
        self._runners[job.job_id] = runner
        task = asyncio.create_task(runner.run(resume), name=f"job-{job.job_id}")
        self._tasks[job.job_id] = task
        task.add_done_callback(lambda _t: self._forget_runner(job.job_id))

    def _forget_runner(self, job_id: str) -> None:
        self._runners.pop(job_id, None)
        self._tasks.pop(job_id, None)

    async def _cancel(self, job_id: str) -> None:
        record = self._records.get(job_id) or self._store.get(job_id)
        if record is None:
            await self.uplink.send(messages.error("unknown_job", job_id, ref="job.cancel"))
            return
        runner = self._runners.get(job_id)
        if record.state.terminal or runner is None:
            return  # cancelling an ended job changes nothing
        log.info("job_cancel_requested", job_id=job_id, state=record.state.value)
        runner.cancel_requested.set()

    def cancellable(self, job_id: str) -> JobRunner:
        """For the operator's cancel (agent.jobs.operator). Raises ``CancelRefused``."""
        record = self._records.get(job_id) or self._store.get(job_id)
        return cancellable(job_id, record, self._runners.get(job_id))

    async def _ack(self, job_id: str) -> None:
        record = self._records.get(job_id) or self._store.get(job_id)
        if record is None:
            await self.uplink.send(messages.error("unknown_job", job_id, ref="job.ack"))
            return
        if not record.state.terminal:
            log.warning("job_ack_before_end", job_id=job_id, state=record.state.value)
            return
        if record.acked_at is None:
            record.acked_at = time.time()
            self._store.update(record)
        self._records.pop(job_id, None)
        self._changed()
        log.info("job_acknowledged", job_id=job_id)

    # -- after a restart ------------------------------------------------------------------

    async def recover(self, containers: list[ContainerState]) -> None:
        """Pick up every unfinished job from the store, given this node's job containers.

        A running or exited container is re-adopted (its end is awaited, then results
        are collected as usual); a job that was uploading resumes from its spool; one
        that had not started yet starts again; one whose container vanished ends
        ``failed`` / ``container_lost``. Containers of jobs that ended, or that the
        store does not know, are removed: nothing runs that nobody owns.
        """
        by_job = {c.job_id: c for c in containers if c.job_id is not None}
        for record in list(self._records.values()):
            # Only unfinished jobs from before the restart: one assigned since (recovery
            # waits for the engine while the link is up) already has its runner.
            if record.state.terminal or record.job_id not in self._from_store:
                continue
            if record.job_id in self._runners:
                continue
            container = by_job.pop(record.job_id, None)
            job = self._readmit(record)
            # Each ending is recorded before its container goes: a kill in between then
            # finds the container again, never a job that ended with nothing recorded.
            if job is None:
                await self._transition(record.job_id, State.FAILED, "agent_error", None)
                await self._remove(container)
            elif record.state in (State.HELD, State.UPLOADING):
                # Its container exited 0 and is kept until the job ends (removed then).
                container_id = container.id if container is not None else record.container_id
                held = record.state is State.HELD  # held again, approvals kept (agent.airlock)
                self._start(job, Resume(container_id=container_id, uploading=True, held=held))
            elif container is not None and container.status != "created":
                log.info("job_readopted", job_id=record.job_id, container=container.id[:12])
                self._start(job, Resume(container_id=container.id, gpus=record.gpu_uuids))
            elif record.state is State.RUNNING:
                await self._transition(record.job_id, State.FAILED, "container_lost", None)
                await self._remove(container)
            else:  # never started: start again from the top
                await self._remove(container)
                self._start(job)
        for container in by_job.values():
            if container.job_id in self._runners:
                continue  # assigned and created while the engine was being listed
            log.warning("container_reaped", job_id=container.job_id, container=container.id[:12])
            await self._remove(container)
        await self._remove_stray_outputs()
        log.info("jobs_recovered", running=len(self._runners))

    async def _remove_stray_outputs(self) -> None:
        """Remove the output of every job that has no runner: ended jobs whose clean-up
        a restart interrupted, and jobs the store no longer knows."""
        outputs = self._ctx.outputs
        for job_id in await asyncio.to_thread(outputs.leftovers, set(self._runners)):
            log.warning("output_reaped", job_id=messages.printable(job_id))
            try:
                await asyncio.to_thread(outputs.remove, job_id)
            except AgentError as exc:
                log.error("output_remove_failed", job_id=messages.printable(job_id), error=str(exc))

    def _readmit(self, record: JobRecord) -> Admitted | None:
        try:
            assign = messages.JobAssign.model_validate({**record.assignment, "type": "job.assign"})
        except ValueError as exc:
            log.error("job_unrecoverable", job_id=record.job_id, error=str(exc))
            return None
        decision = admit(
            assign,
            self._config(),
            node_cpus=self._node_cpus(),
            gpus=self._gpus(),
            gpu_support=self._gpu_support(),
        )
        if isinstance(decision, Rejected):
            log.error("job_unrecoverable", job_id=record.job_id, refused=decision.detail)
            return None
        return decision

    async def _remove(self, container: ContainerState | None) -> None:
        if container is None:
            return
        try:
            await asyncio.to_thread(self._ctx.runtime.remove, container.id)
        except AgentError as exc:
            log.error("container_remove_failed", container=container.id[:12], error=str(exc))

    # -- the one place a job changes state -------------------------------------------------

    async def _transition(
        self, job_id: str, state: State, reason: str | None, exit_code: int | None
    ) -> None:
        record = self._records[job_id]
        if not state.terminal and ORDER.index(state) <= ORDER.index(record.state):
            return  # a re-adopted job repeating a step it had already reported
        check_transition(record.state, state, reason)
        now = time.time()
        record.state, record.reason, record.exit_code = state, reason, exit_code
        record.updated_at = now
        runner = self._runners.get(job_id)
        if runner is not None:
            record.container_id, record.gpu_uuids = runner.container_id, runner.gpus
        if state.terminal:
            record.ended_at = now
            self.tally.job_ended(state.value, reason, now - record.created_at)
            # The end must reach the store, the ledger and the control plane whatever
            # the disk does (a full disk once left a job unended for good): retry.
            await until_done(lambda: self._store.update(record), NOT_RECORDED, job_id=job_id)
            if self._audit is not None:
                audit = self._audit
                await until_done(
                    lambda: audit.job_ended(job_id, state.value, reason, exit_code),
                    NOT_RECORDED,
                    job_id=job_id,
                )
        else:
            self._store.update(record)
        self._changed()
        log.info("job_state", job_id=job_id, state=state.value, reason=reason, exit_code=exit_code)
        await self._send_state(record)

    def _changed(self) -> None:
        self._on_change()

    async def _send_state(self, record: JobRecord) -> None:
        await self.uplink.send(
            messages.job_state(
                record.job_id,
                record.state.value,
                record.updated_at,
                reason=record.reason,
                exit_code=record.exit_code,
            )
        )

    # -- views ------------------------------------------------------------------------

    def active(self) -> int:
        """Jobs holding a slot: accepted and not yet ended."""
        return sum(1 for r in self._records.values() if not r.state.terminal)

    def _free_mib(self) -> int | None:
        """Free space where jobs write (the state directory's file system), or None when
        it cannot be read (the store's own write then decides)."""
        try:
            return shutil.disk_usage(self._ctx.outputs.jobs_dir.parent).free // (1024 * 1024)
        except OSError:
            return None

    def abandoned(self, job_id: str) -> bool:
        """Whether a container of ``job_id`` is nobody's: no runner holds it and the job
        ended or is unknown (an unfinished one waits for recovery). For the reaper."""
        record = self._records.get(job_id) or self._store.get(job_id)
        return job_id not in self._runners and (record is None or record.state.terminal)

    def unacknowledged_ended(self) -> int:
        """Jobs that ended and wait for the control plane's ``job.ack``."""
        return sum(1 for r in self._records.values() if r.state.terminal)

    def snapshot(self) -> list[dict[str, Any]]:
        """Every unacknowledged job, for /status and ``cloudbender-agent jobs``."""
        out = []
        for record in self._records.values():
            runner = self._runners.get(record.job_id)
            image = record.assignment.get("image", {}).get("ref")
            out.append(
                {
                    "job_id": record.job_id,
                    "state": record.state.value,
                    "reason": record.reason,
                    "exit_code": record.exit_code,
                    "created_at": record.created_at,
                    "state_since": record.updated_at,  # held: waiting since (airlock)
                    "image": image,
                    "datastore": record.assignment.get("datastore"),
                    "gpus": list(runner.gpus if runner else record.gpu_uuids),
                }
            )
        return out

    async def stop(self) -> None:
        """Stop the runners (containers keep running: they are re-adopted at start)."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
