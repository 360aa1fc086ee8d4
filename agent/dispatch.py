"""The agent's :class:`~agent.link.SessionHandler`: what the control plane says, routed.

Each part gets the messages it owns and nothing else: ``job.*`` go to the job manager,
``result.*`` to the uploader, ``artifact.*`` and ``error unknown_artifact`` to the
model fetcher. The parts are given in the constructor; none of them knows the others or
the connection. After every ``welcome`` the uplink is attached first (so that what the
parts send goes to the new session), then the manager resends the state of every job,
then fetches in flight ask again from their offsets.
"""

from __future__ import annotations

from typing import Protocol

import structlog

from agent.link import Link, Uplink
from agent.models.fetch import ArtifactFetcher
from agent.protocol import messages
from agent.protocol.session import PeerError

log = structlog.get_logger(__name__)


class Jobs(Protocol):
    """What the dispatcher needs of :class:`agent.jobs.manager.JobManager`."""

    def hello_jobs(self) -> list[dict[str, str]]: ...

    async def session_started(self) -> None: ...

    async def on_job_message(
        self, message: messages.JobAssign | messages.JobCancel | messages.JobAck
    ) -> None: ...

    async def reject_invalid(self, job_id: str, detail: str) -> None: ...


class Results(Protocol):
    """What the dispatcher needs of :class:`agent.results.uploader.Uploader`."""

    def route(self, message: messages.Incoming) -> bool: ...


class Dispatcher:
    def __init__(
        self, *, uplink: Uplink, jobs: Jobs, results: Results, artifacts: ArtifactFetcher
    ) -> None:
        self._uplink = uplink
        self._jobs = jobs
        self._results = results
        self._artifacts = artifacts

    def hello_jobs(self) -> list[dict[str, str]]:
        return self._jobs.hello_jobs()

    async def on_established(self, link: Link) -> None:
        self._uplink.attach(link)
        await self._jobs.session_started()
        self._artifacts.on_session()

    def on_closed(self) -> None:
        self._uplink.detach()

    async def on_message(self, link: Link, message: messages.Incoming) -> None:
        if isinstance(message, messages.JobAssign | messages.JobCancel | messages.JobAck):
            await self._jobs.on_job_message(message)
        elif isinstance(message, messages.ArtifactChunk):
            self._artifacts.on_chunk(message)
        elif isinstance(message, messages.ArtifactEnd):
            self._artifacts.on_end(message)
        elif not self._results.route(message):
            # A result.* message for a job that is not uploading (ended, or unknown).
            job_id = getattr(message, "job_id", None)
            if job_id is not None:
                await self._uplink.send(messages.error("unknown_job", job_id, ref=message.type))
            else:
                log.info("message_dropped", type=type(message).__name__)

    async def on_invalid_assignment(self, link: Link, job_id: str, detail: str) -> None:
        await self._jobs.reject_invalid(job_id, detail)

    async def on_peer_error(self, link: Link, error: PeerError) -> None:
        # The only error that changes anything here: unknown_artifact ends a fetch.
        self._artifacts.on_error(error)
