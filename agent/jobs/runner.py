"""One job's life, from a free slot to its terminal state.

``accepted → [waiting] → preparing → running → uploading → succeeded`` or an ending from
any of them. The runner owns the job's container, GPU lease and model reference, and
releases all three in ``finally`` whatever happens. Every state change goes through
the manager's ``transition`` callback (store, ``job.state``, metrics) and nowhere else.

Cancellation (``job.cancel``) and the timeout are not ``Task.cancel()``: the container
runs in the engine, not in this task, so the runner races each long wait against the
cancel event and then stops the container through the engine (SIGTERM, the grace
period, SIGKILL).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import structlog

from agent.errors import (
    AgentError,
    ContainerCreateError,
    ContainerRuntimeError,
    ImageDigestMismatch,
    ImageNotFound,
    ImagePullFailed,
)
from agent.faults import crash_point
from agent.jobs.admission import Admitted
from agent.jobs.context import JobEnded, Resume, RunnerContext
from agent.jobs.engine import check_not_lost, wait_slice
from agent.jobs.model import FAILURE_REASONS, State
from agent.loops import Interrupted, unless_set
from agent.results.spool import Manifest
from agent.runtime.base import ContainerSpec, ContainerState

log = structlog.get_logger(__name__)
T = TypeVar("T")

WAIT_SLICE_S = 1.0
STOP_SETTLE_S = 30.0  # after a stop, how long the engine may take to report the end

Transition = Callable[[State, str | None, int | None], Awaitable[None]]


class JobRunner:
    def __init__(self, ctx: RunnerContext, job: Admitted, transition: Transition) -> None:
        self._ctx = ctx
        self._job = job
        self._transition = transition
        self.cancel_requested = asyncio.Event()
        self.cancel_reason = "cancel_requested"  # or cancelled_on_node (agent.jobs.operator)
        self.container_id: str | None = None
        self.gpus: tuple[str, ...] = ()
        # Set once the container has exited: every ending after that carries it.
        self.exit_code: int | None = None

    @property
    def job_id(self) -> str:
        return self._job.job_id

    def output_dir(self) -> Path:
        return self._ctx.outputs.mount_point(self.job_id)

    async def run(self, resume: Resume | None = None) -> None:
        """Drive the job to its terminal state. Never raises, but ``CancelledError``.

        Cancelling this task means the agent is shutting down, not that the job is
        cancelled: the container is left running and the job keeps its state, to be
        re-adopted at the next start (docs/design.md §5).
        """
        try:
            await self._run(resume)
            await self._end(State.SUCCEEDED, "completed", self.exit_code)
        except JobEnded as end:
            exit_code = end.exit_code if end.exit_code is not None else self.exit_code
            await self._end(end.state, end.reason, exit_code)
        except AgentError as exc:
            # Errors that know their docs/protocol.md failure reason carry it as ``reason``
            # (model, result, spool and upload errors); anything else is agent_error.
            reason = getattr(exc, "reason", None)
            reason = reason if reason in FAILURE_REASONS else "agent_error"
            log.error("job_failed", job_id=self.job_id, reason=reason, error=str(exc))
            await self._end(State.FAILED, reason, self.exit_code)
        except asyncio.CancelledError:
            log.info("job_left_running", job_id=self.job_id, container=self.container_id)
            raise
        except Exception:
            log.exception("job_runner_crashed", job_id=self.job_id)
            await self._end(State.FAILED, "agent_error", self.exit_code)

    async def _end(self, state: State, reason: str, exit_code: int | None) -> None:
        # GPUs and the model first, so that when the control plane hears that the job
        # ended they are free; then the end is recorded (the manager retries that until
        # it is stored); only then are the container and the output removed.
        self._release()
        await self._transition(state, reason, exit_code)
        if state is not State.SUCCEEDED:  # spooled results that will never leave
            try:
                await asyncio.to_thread(self._ctx.results.spool.remove, self.job_id)
            except (AgentError, OSError) as exc:
                log.error("spool_remove_failed", job_id=self.job_id, error=str(exc))
        await self._cleanup()

    async def _run(self, resume: Resume | None) -> None:
        """Returns when the results were accepted; raises :class:`JobEnded` otherwise."""
        if resume is not None:
            self.container_id = resume.container_id
        if resume is not None and resume.uploading:
            self.exit_code = 0  # only a container that exited 0 gets to uploading
            return await self._deliver(resume.held)
        if resume is not None and resume.container_id is not None:
            # Re-adopted after an agent restart: the container is the engine's, still
            # running or already exited; carry on from waiting for its end.
            self.gpus = resume.gpus
            self._ctx.leases.restore(self.job_id, self.gpus)
            await asyncio.to_thread(self._ctx.outputs.ensure_mounted, self.job_id)
            await self._transition(State.RUNNING, None, None)
        else:
            await self._prepare_and_start()
        exited = await self._wait_for_exit()
        self.exit_code = exited.exit_code
        if await self._output_full():
            # docs/protocol.md §5: whatever the exit code, a job that filled its output
            # ends result_too_large (it most likely failed because of the cap).
            raise JobEnded(State.FAILED, "result_too_large", exited.exit_code)
        if exited.oom_killed:
            raise JobEnded(State.FAILED, "oom_killed", exited.exit_code)
        if exited.exit_code != 0:  # the job's, unless the engine ended it (container_lost)
            await check_not_lost(self._ctx.runtime, self._ctx.engine, exited)
            raise JobEnded(State.FAILED, "exit_nonzero", exited.exit_code)
        return await self._deliver(self._ctx.airlock is not None and self._ctx.airlock.required())

    async def _deliver(self, hold: bool) -> None:
        if hold and self._ctx.airlock is not None:  # spool, then held (agent.airlock.hold)
            self._release()  # a job waiting for a person holds no GPU
            args = (self._job, self._spool_for_review, self._transition, self.cancel_requested)
            if not await self._ctx.airlock.hold(*args):
                raise JobEnded(State.CANCELLED, self.cancel_reason)
        await self._transition(State.UPLOADING, None, None)
        # The output stays until the job ends (_cleanup): removing a large one (an unmount
        # that flushes its pages, then the image) takes about as long as sending it, and
        # the spool's copy is what is sent. docs/results.md §2.
        await self._until_cancelled(self._ctx.results.deliver(await self._spool()))

    async def _prepare_and_start(self) -> None:
        self.gpus = await self._lease_gpus()
        await self._transition(State.PREPARING, None, None)
        image_id = await self._until_cancelled(self._image())
        model_dir = await self._model()
        job, outputs = self._job, self._ctx.outputs
        output = await asyncio.to_thread(outputs.prepare, job.job_id)
        # The output's file system (mkfs and a loop mount: about 8 ms, most of the
        # agent's own share of a job's start) is made while the engine creates the
        # container, whose bind source the empty mount point already is. The container
        # starts only once both are done, so the job never sees the bare directory.
        made = asyncio.ensure_future(
            asyncio.to_thread(outputs.make, job.job_id, job.max_result_bytes, job.max_result_files)
        )
        try:
            spec = self._spec(image_id, model_dir, output)
            self.container_id = await asyncio.to_thread(self._ctx.runtime.create, spec)
        except BaseException as exc:
            # The clean-up that follows must not race the thread still making the file
            # system; and what ends the job (or a shutdown's cancellation, which leaves
            # the job to the next start) is this error, not a failure of the file system.
            try:
                await made
            except AgentError as failed:
                log.error("output_fs_failed", job_id=self.job_id, error=str(failed))
            if isinstance(exc, ContainerCreateError):
                log.error("container_create_failed", job_id=self.job_id, error=str(exc))
                raise JobEnded(State.FAILED, "container_error") from exc
            raise
        await made  # its error ends the job; the clean-up removes the created container
        if self.cancel_requested.is_set():
            raise JobEnded(State.CANCELLED, self.cancel_reason)
        try:
            await asyncio.to_thread(self._ctx.runtime.start, self.container_id)
        except ContainerRuntimeError as exc:
            log.error("container_start_failed", job_id=self.job_id, error=str(exc))
            raise JobEnded(State.FAILED, "container_error") from exc
        await self._transition(State.RUNNING, None, None)
        await self._audit_start(self.container_id)

    async def _spool(self) -> Manifest:
        results, outputs = self._ctx.results, self._ctx.outputs
        manifest = results.spool.load(self.job_id)
        if manifest is None:
            # Not spooled yet (or interrupted): the output must still be there, whole.
            output = await asyncio.to_thread(outputs.ensure_mounted, self.job_id)
            if output is None:
                raise JobEnded(State.FAILED, "agent_error", self.exit_code)
            manifest = await results.spool_output(
                self.job_id, output, self._job.max_result_bytes, self._job.max_result_files
            )
        crash_point("spool.manifest_written")  # a durable, verified copy; the output stays
        return manifest

    async def _spool_for_review(self) -> Manifest:
        """Spool, then remove the output at once: a review may take days."""
        manifest = await self._spool()
        await self._remove_output()
        crash_point("spool.output_removed")
        return manifest

    # -- steps ----------------------------------------------------------------------------

    async def _lease_gpus(self) -> tuple[str, ...]:
        job, ctx = self._job, self._ctx
        waiting = False
        while True:
            # try_lease and taking the next signal happen with no await in between, so a
            # release cannot slip through unnoticed.
            lease = ctx.leases.try_lease(
                job.job_id, job.gpu_count, job.gpu_types, ctx.gpu_inventory()
            )
            if lease is not None:
                return lease
            changed = ctx.resources_changed.next()
            if not waiting:
                waiting = True
                await self._transition(State.WAITING, None, None)
                log.info("job_waiting_for_gpus", job_id=job.job_id, count=job.gpu_count)
            await self._until_cancelled(changed)

    async def _image(self) -> str:
        runtime, job = self._ctx.runtime, self._job
        try:
            image = await asyncio.to_thread(runtime.image_id, job.image_ref, job.image_digest)
            if image is not None:
                return image
            if not self._ctx.allow_pull():
                log.error("image_not_on_node", job_id=job.job_id, image=job.image_ref)
                raise JobEnded(State.FAILED, "image_unavailable")
            auth = job.image_auth.model_dump() if job.image_auth is not None else None
            return await asyncio.to_thread(
                runtime.pull, job.image_ref, job.image_digest, auth, self._ctx.pull_timeout_s
            )
        except ImageDigestMismatch as exc:
            log.error("image_digest_mismatch", job_id=job.job_id, error=str(exc))
            raise JobEnded(State.FAILED, "image_digest_mismatch") from exc
        except (ImageNotFound, ImagePullFailed) as exc:
            log.error("image_unavailable", job_id=job.job_id, error=str(exc))
            raise JobEnded(State.FAILED, "image_unavailable") from exc

    async def _model(self) -> Path | None:
        model = self._job.model
        if model is None:
            return None
        if self._ctx.models is None:
            raise JobEnded(State.FAILED, "model_unavailable")
        return await self._until_cancelled(
            self._ctx.models.acquire(self.job_id, model, float(self._job.timeout_s))
        )

    def _spec(self, image_id: str, model_dir: Path | None, output: Path) -> ContainerSpec:
        job = self._job
        return ContainerSpec(
            job_id=job.job_id,
            node_id=self._ctx.node_id,
            image=job.image_ref,
            image_id=image_id,
            command=job.command,
            env=dict(job.env),
            user=self._ctx.job_user(),
            data_dir=job.datastore.path,
            model_dir=model_dir,
            output_dir=output,
            cpus=job.cpus,
            memory_mib=job.memory_mib,
            pids=job.pids,
            tmp_mib=job.tmp_mib,
            shm_mib=job.shm_mib,
            gpu_uuids=self.gpus,
        )

    async def _audit_start(self, cid: str) -> None:
        audit = self._ctx.audit
        if audit is None:
            return
        isolation = await asyncio.to_thread(self._ctx.runtime.applied_isolation, cid)
        await asyncio.to_thread(audit.container_started, self.job_id, cid, isolation)

    async def _wait_for_exit(self) -> ContainerState:
        """The container's end, or stop it on cancel or timeout and end the job so."""
        assert self.container_id is not None
        cid = self.container_id
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._job.timeout_s
        while True:
            waiting = loop.run_in_executor(self._ctx.wait_pool, self._wait_briefly, cid)
            try:
                async with asyncio.timeout_at(deadline):
                    exited = await unless_set(self.cancel_requested, waiting)
            except Interrupted:
                state, reason = State.CANCELLED, self.cancel_reason
                break
            except TimeoutError:
                state, reason = State.TIMED_OUT, "timeout"
                break
            if exited is not None:
                return exited
            if await self._output_full():
                # Its writes fail already (ENOSPC); stop it rather than let it spin.
                state, reason = State.FAILED, "result_too_large"
                break
        log.info("job_stopping", job_id=self.job_id, why=reason)
        grace = self._ctx.stop_grace_s()
        await asyncio.to_thread(self._ctx.runtime.stop, cid, grace)
        # The engine said it stopped it; its end is a wait slice or two away. Bounded: an
        # engine that never reports the end must not hold the job (the container is
        # removed by force in the clean-up).
        settle = loop.time() + grace + STOP_SETTLE_S
        exited = None
        while exited is None and loop.time() < settle:
            # The default pool: this job's thread in the wait pool may still be busy
            # with the slice the stop interrupted.
            exited = await loop.run_in_executor(None, self._wait_briefly, cid)
        if exited is None:
            log.warning("job_stop_unconfirmed", job_id=self.job_id, container=cid[:12])
        raise JobEnded(state, reason, exited.exit_code if exited is not None else None)

    def _wait_briefly(self, cid: str) -> ContainerState | None:
        # Waits are short and repeated rather than one long blocking call: a thread
        # blocked on a container that outlives the agent would hold up its exit.
        return wait_slice(self._ctx.runtime, self._ctx.engine, cid, WAIT_SLICE_S)

    async def _until_cancelled(self, awaitable: Awaitable[T]) -> T:
        """Await ``awaitable`` unless the job is cancelled first (then end it cancelled)."""
        try:
            return await unless_set(self.cancel_requested, awaitable)
        except Interrupted:
            raise JobEnded(State.CANCELLED, self.cancel_reason) from None

    def _release(self) -> None:
        """Give back what only this process holds (GPUs, the model): safe before the
        end is recorded, since a restart rebuilds both from the store and the engine."""
        if self._ctx.models is not None:
            self._ctx.models.release(self.job_id)
        self._ctx.leases.release(self.job_id)
        self._ctx.resources_changed.fire()

    async def _cleanup(self) -> None:
        """Keep the output's tail (``logs JOB``), remove the container and the output.
        Only after the end is recorded: a kill before then finds both and judges the job
        again (never ``container_lost`` for one that exited 0). Idempotent; logs errors."""
        if (cid := self.container_id) is not None:
            if (logs := self._ctx.job_logs) is not None:
                await asyncio.to_thread(logs.capture, self._ctx.runtime, self.job_id, cid)
            try:
                await asyncio.to_thread(self._ctx.runtime.remove, cid)
            except ContainerRuntimeError as exc:
                log.error("container_remove_failed", job_id=self.job_id, error=str(exc))
        await self._remove_output()
        crash_point("spool.output_removed")

    async def _remove_output(self) -> None:
        try:
            await asyncio.to_thread(self._ctx.outputs.remove, self.job_id)
        except AgentError as exc:
            log.error("output_remove_failed", job_id=self.job_id, error=str(exc))

    async def _output_full(self) -> bool:
        usage = await asyncio.to_thread(self._ctx.outputs.usage, self.job_id)
        return usage is not None and usage.full
