"""The session handler of an agent that runs no jobs (until the job manager lands).

It answers every message the way PROTOCOL.md asks of a node with no job slots and no
jobs: an assignment is refused (``bad_spec`` when malformed, else ``no_capacity``),
``job.cancel`` / ``job.ack`` / ``result.*`` name a job this node does not know
(``error`` / ``unknown_job``), and artifact frames nobody asked for are dropped.
"""

from __future__ import annotations

import structlog

from agent.connection import Link
from agent.protocol import messages as m

log = structlog.get_logger(__name__)

_JOB_MESSAGES = (
    m.JobAck,
    m.JobCancel,
    m.ResultResume,
    m.ResultAck,
    m.ResultAccepted,
    m.ResultRejected,
)


class NoJobs:
    def hello_jobs(self) -> list[dict[str, str]]:
        return []

    async def on_established(self, link: Link) -> None:
        return None

    async def on_message(self, link: Link, message: m.Incoming) -> None:
        if isinstance(message, m.JobAssign):
            await link.send(
                m.job_rejected(message.job_id, "no_capacity", "this agent runs no jobs yet")
            )
        elif isinstance(message, _JOB_MESSAGES):
            await link.send(m.error("unknown_job", message.job_id, ref=message.type))
        else:
            log.info("message_dropped", type=type(message).__name__)

    async def on_invalid_assignment(self, link: Link, job_id: str, detail: str) -> None:
        await link.send(m.job_rejected(job_id, "bad_spec", detail))

    def on_closed(self) -> None:
        return None
