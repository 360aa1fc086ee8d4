"""The ``held`` step of a job's life (docs/airlock.md, docs/protocol.md §5a).

With ``results.review: manual`` the runner spools a job's results and calls
:meth:`Airlock.hold`, which records the hold (the ledger's ``result_held`` with every
file's hash, then the job store), sends ``job.state`` ``held`` and waits until one of:

- enough distinct reviewers released it (``results.review_approvals``): ledger
  ``result_released``; :meth:`Airlock.hold` returns True and the job goes on uploading;
- anyone refused it: the spool is removed, :class:`ResultRefused` is raised (the job
  ends ``failed`` / ``result_refused``);
- ``results.review_timeout_h`` passed since it was first held: the spool is removed,
  :class:`ReviewTimedOut` is raised (``failed`` / ``review_timeout``);
- the job was cancelled: the spool is removed and :meth:`Airlock.hold` returns False.

Nothing of the results is sent before it returns True. The hold, its start time and
every decision are in the job store (:mod:`agent.airlock.approvals`), so a job held
when the agent stopped is held again at the next start, with its approvals and its
deadline (counted from the first hold). The rows are dropped by :meth:`Airlock.prune`
once the job is no longer held: never while its end may still be unrecorded.

A configured ``results.review_command`` runs once, when a job is first held, beside
the wait (:mod:`agent.airlock.command`): approve is one approval by
``review_command``, refuse a refusal with its words in the ledger, anything else
leaves the job to a person.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import structlog

from agent.airlock.approvals import ApprovalStore, Decision, Vote
from agent.audit import AuditLedger
from agent.config.models import ResultsConfig
from agent.errors import AgentError
from agent.jobs.admission import Admitted
from agent.jobs.model import State
from agent.results.spool import Manifest, Spool

log = structlog.get_logger(__name__)

RECHECK_S = 60.0  # a reloaded review_timeout_h applies to waiting jobs within this
COMMAND_MAX_S = 600.0  # a review_command gets at most this, and half the review time left
REVIEW_COMMAND = "review_command"  # the reviewer name of the consumer's program

Transition = Callable[[State, str | None, int | None], Awaitable[None]]


class ResultRefused(AgentError):
    reason = "result_refused"


class ReviewTimedOut(AgentError):
    reason = "review_timeout"


class Verdict(Protocol):
    @property
    def outcome(self) -> str: ...
    @property
    def text(self) -> str: ...


# agent.airlock.command.run_review_command's shape: (argv, user, files, manifest, timeout_s).
ReviewCommandFn = Callable[[Sequence[str], str, Path, dict[str, Any], float], Awaitable[Verdict]]


@dataclass
class HeldJob:
    """A job waiting for review, as ``review list`` / ``review show`` see it."""

    job_id: str
    image: str
    datastore: str
    manifest: Manifest
    held_since: float
    wake: asyncio.Event = field(default_factory=asyncio.Event)


class Airlock:
    """Owned by the job system; one per agent. ``config`` is read when used (reload)."""

    def __init__(
        self,
        config: Callable[[], ResultsConfig],
        store: ApprovalStore,
        spool: Spool,
        audit: AuditLedger | None,
        job_user: Callable[[], str],
        command: ReviewCommandFn | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self.store = store
        self.spool = spool
        self.audit = audit
        self._job_user = job_user
        self._command = command
        self._clock = clock
        self._held: dict[str, HeldJob] = {}

    def required(self) -> bool:
        """Whether a job whose container exited 0 now must be held."""
        return self._config().review == "manual"

    def needed(self) -> int:
        return self._config().review_approvals

    def held(self) -> list[HeldJob]:
        return sorted(self._held.values(), key=lambda h: (h.held_since, h.job_id))

    def get(self, job_id: str) -> HeldJob | None:
        return self._held.get(job_id)

    def deadline(self, entry: HeldJob) -> float:
        return entry.held_since + self._config().review_timeout_h * 3600

    def outcome(self, votes: list[Vote]) -> Decision | None:
        """Refused by anyone, released by enough distinct reviewers, or undecided."""
        if any(v.decision == "refuse" for v in votes):
            return "refuse"
        releasers = {v.reviewer for v in votes if v.decision == "release"}
        return "release" if len(releasers) >= self.needed() else None

    def vote(self, job_id: str, reviewer: str, decision: Decision) -> bool:
        """Record a decision already in the ledger, and wake the waiting job; False when
        this reviewer had made it before."""
        new = self.store.vote(job_id, reviewer, decision, self._clock())
        if (entry := self._held.get(job_id)) is not None:
            entry.wake.set()
        return new

    async def hold(
        self,
        job: Admitted,
        spool: Callable[[], Awaitable[Manifest]],
        transition: Transition,
        cancel: asyncio.Event,
    ) -> bool:
        """Hold the job until it is decided (see the module doc); ``spool`` gives the
        spooled manifest (spooling first if need be). True: released."""
        job_id = job.job_id
        since = self.store.held_since(job_id)
        if since is not None and self.outcome(self.store.votes(job_id)) == "refuse":
            await self._discard(job_id)  # refused before a restart: no need to look again
            raise ResultRefused("the results were refused at review")
        manifest = await spool()
        fresh = since is None
        if since is None:
            await self._record_held(manifest)
            since = self.store.hold(job_id, self._clock())
        entry = HeldJob(job_id, job.image_ref, job.datastore.name, manifest, since)
        task = None
        try:
            self._held[job_id] = entry
            await transition(State.HELD, None, None)
            argv = self._config().review_command
            if self._command is not None and argv is not None and fresh:  # once per hold
                task = asyncio.create_task(self._run_command(entry, argv))
            return await self._wait(entry, cancel)
        finally:
            self._held.pop(job_id, None)
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def _wait(self, entry: HeldJob, cancel: asyncio.Event) -> bool:
        job_id = entry.job_id
        while True:
            votes = self.store.votes(job_id)
            decided = self.outcome(votes)
            if decided == "release":
                reviewers = sorted({v.reviewer for v in votes if v.decision == "release"})
                await self._append("result_released", job_id, reviewers=reviewers)
                log.info("results_released", job_id=job_id, approvals=len(reviewers))
                return True
            if decided == "refuse":
                await self._discard(job_id)
                raise ResultRefused("the results were refused at review")
            remaining = self.deadline(entry) - self._clock()
            if remaining <= 0:
                log.warning("review_timed_out", job_id=job_id)
                await self._discard(job_id)
                raise ReviewTimedOut("nobody released the results in time")
            if cancel.is_set():
                await self._discard(job_id)
                return False
            entry.wake.clear()
            waits = [asyncio.ensure_future(entry.wake.wait()), asyncio.ensure_future(cancel.wait())]
            try:
                await asyncio.wait(
                    waits, timeout=min(remaining, RECHECK_S), return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                for w in waits:
                    w.cancel()

    async def _record_held(self, manifest: Manifest) -> None:
        files = [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in manifest.files]
        await self._append(
            "result_held", manifest.job_id, files=files, total_bytes=manifest.total_bytes
        )

    async def _append(self, kind: str, job_id: str, **fields: Any) -> None:
        if self.audit is not None:
            await asyncio.to_thread(self.audit.append, kind, job_id, **fields)

    async def _discard(self, job_id: str) -> None:
        """Nothing of the results will leave: remove the spool (logged if it cannot be;
        the job still ends, and prune tries again)."""
        try:
            await asyncio.to_thread(self.spool.remove, job_id)
        except OSError as exc:
            log.error("held_results_not_removed", job_id=job_id, error=str(exc))

    async def _run_command(self, entry: HeldJob, argv: list[str]) -> None:
        assert self._command is not None
        job_id = entry.job_id
        # At most half the review time left: a person still has time after an undecided.
        timeout = max(1.0, min(COMMAND_MAX_S, (self.deadline(entry) - self._clock()) / 2))
        files = self.spool.data_path(job_id).parent
        try:
            verdict = await self._command(
                argv, self._job_user(), files, entry.manifest.to_message(), timeout
            )
        except AgentError as exc:
            log.error("review_command_unavailable", job_id=job_id, error=str(exc))
            await self._append("review_command_undecided", job_id, why=str(exc))
            return
        if verdict.outcome == "approve":
            await self._append("result_approved", job_id, reviewer=REVIEW_COMMAND, text="")
            self.vote(job_id, REVIEW_COMMAND, "release")
        elif verdict.outcome == "refuse":
            await self._append("result_refused", job_id, reviewer=REVIEW_COMMAND, text=verdict.text)
            self.vote(job_id, REVIEW_COMMAND, "refuse")
        else:
            log.warning("review_command_undecided", job_id=job_id, why=verdict.text)
            await self._append("review_command_undecided", job_id, why=verdict.text)

    def prune(self, still_held: Callable[[str], bool]) -> None:
        """Forget holds of jobs that are no longer held (their end or upload is recorded),
        removing the spool of any that will not be sent. For the janitor."""
        for job_id in self.store.held_jobs():
            if still_held(job_id) or job_id in self._held:
                continue
            votes = self.store.votes(job_id)
            if self.outcome(votes) != "release":
                with contextlib.suppress(OSError):
                    self.spool.remove(job_id)
            self.store.forget(job_id)
