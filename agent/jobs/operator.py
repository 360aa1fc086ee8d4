"""The node operator's cancel (``cloudbender-agent cancel JOB``): which jobs it may stop,
and how. Pure but for setting the runner's cancel event.

A job the operator cancels ends ``cancelled`` / ``cancelled_on_node`` (docs/protocol.md
§4), through the runner's usual cancel path: its container is stopped (SIGTERM, the
grace period, SIGKILL), the ending is recorded and sent to the control plane as
``job.state``. If the control plane's ``job.cancel`` got there first, its reason
(``cancel_requested``) stands: a job ends once.
"""

from __future__ import annotations

from agent.errors import AgentError
from agent.jobs.runner import JobRunner
from agent.jobs.store import JobRecord

REASON = "cancelled_on_node"


class CancelRefused(AgentError):
    """The job cannot be cancelled; ``code`` is ``unknown_job``, ``job_ended`` or
    ``not_running``, the message says why in a person's words."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def cancellable(job_id: str, record: JobRecord | None, runner: JobRunner | None) -> JobRunner:
    """The runner to stop for ``job_id``. Raises :class:`CancelRefused`."""
    if record is None:
        raise CancelRefused("unknown_job", f"no job {job_id} on this node")
    if record.state.terminal:
        raise CancelRefused(
            "job_ended", f"job {job_id} has already ended {record.state.value} ({record.reason})"
        )
    if runner is None:
        # Only between a restart and the engine answering: recovery has not re-adopted
        # the job yet, so there is no container to stop.
        raise CancelRefused("not_running", f"job {job_id} is not re-adopted yet; try again")
    return runner


def cancel_on_node(runner: JobRunner) -> None:
    """Ask ``runner`` to end its job ``cancelled_on_node``. Idempotent."""
    if not runner.cancel_requested.is_set():
        runner.cancel_reason = REASON
        runner.cancel_requested.set()
