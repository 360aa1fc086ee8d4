"""Jobs (docs/protocol.md §4) as the control plane sees them. Pure: no I/O.

A :class:`JobTrack` per job is kept on the node's record: what the CP sent
(``job.assign``, ``job.cancel``, ``job.ack``) and what the agent answered. The
``check_*`` functions take one message from the agent, update the track and return
what in it breaks §4, as violation texts:

- ``job.accepted`` / ``job.rejected``: exactly one per ``job.assign`` sent; never
  ``job.accepted`` once the job ended (a repeat then is ``duplicate_job``), never a
  rejection other than ``duplicate_job`` of a job the agent accepted and has not ended.
- ``job.state``: only for a job the CP assigned (and the agent accepted) or that
  ``hello.jobs`` listed. Within one session the states go in order, ``accepted`` →
  [``waiting``] → ``preparing`` → ``running`` → [``held``] → ``uploading``, the first being
  ``accepted``; an unchanged state may be repeated. Across a reconnect a job may
  have moved on while nobody heard: any later state is fine, an earlier one is not.
  One terminal state, with its reason; repeated unchanged only in later sessions.
  ``succeeded`` carries ``exit_code`` 0 and comes after this CP accepted the results;
  ``exit_nonzero`` carries a non-zero ``exit_code``; a failure after the container
  exited (``oom_killed``, ``result_invalid``, ``result_too_large``, ``result_refused``,
  ``review_timeout``) carries its ``exit_code`` (1.1); a failure before the container
  existed carries none.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from agent.controlplane.validate import ALL_STATES, JOB_STATES

TERMINAL = frozenset({"succeeded", "failed", "cancelled", "timed_out"})
_NEXT = {
    "accepted": {"waiting", "preparing"},
    "waiting": {"preparing"},
    "preparing": {"running"},
    "running": {"held", "uploading"},  # held only on nodes that review results (§5a)
    "held": {"uploading"},
    "uploading": set[str](),
}
# Failure reasons that end a job before its container ran: no exit_code then.
_NEVER_RAN = frozenset(
    {
        "image_unavailable",
        "image_digest_mismatch",
        "model_unavailable",
        "model_checksum_mismatch",
        "container_error",
    }
)
# Failure reasons that end a job after its container exited: exit_code required (1.1).
_RAN = frozenset(
    {
        "exit_nonzero",
        "oom_killed",
        "result_invalid",
        "result_too_large",
        "result_refused",
        "review_timeout",
    }
)


@dataclass
class JobTrack:
    """One job on one node, as far as this CP knows it."""

    job_id: str
    assigns: int = 0
    cancels: int = 0
    acks: int = 0
    answers: list[str] = field(default_factory=list)  # "accepted", or the rejection code
    states: list[dict[str, Any]] = field(default_factory=list)  # job.state messages
    state: str | None = None  # the furthest state heard of (hello.jobs included)
    terminal: dict[str, Any] | None = None  # the first terminal job.state
    listed: bool = False  # named in a hello.jobs: its history may predate this CP
    state_session: str | None = None  # the session of the latest job.state
    accepted_session: str | None = None  # the session of the latest job.accepted


def build_assign(job_id: str, image_ref: str, datastore: str, **fields: Any) -> dict[str, Any]:
    """A ``job.assign``: ``fields`` are added as given, except ``image`` (merged with the ref)."""
    image = {"ref": image_ref} | dict(fields.pop("image", None) or {})
    message = {"type": "job.assign", "job_id": job_id, "image": image, "datastore": datastore}
    return message | copy.deepcopy(fields)


_SENT_COUNTERS = {"job.assign": "assigns", "job.cancel": "cancels", "job.ack": "acks"}


def note_sent(tracks: dict[str, JobTrack], message: Any) -> None:
    """Count a ``job.assign`` / ``job.cancel`` / ``job.ack`` that the CP sent; ignore the rest."""
    if not isinstance(message, dict) or not isinstance(message.get("job_id"), str):
        return
    kind = _SENT_COUNTERS.get(str(message.get("type")))
    if kind is not None:
        track = tracks.setdefault(message["job_id"], JobTrack(message["job_id"]))
        setattr(track, kind, getattr(track, kind) + 1)


def note_listed(tracks: dict[str, JobTrack], jobs: Any) -> None:
    """Take note of the jobs a ``hello`` lists (their shapes are checked elsewhere)."""
    for entry in jobs if isinstance(jobs, list) else []:
        if not isinstance(entry, dict) or not isinstance(entry.get("job_id"), str):
            continue
        track = tracks.setdefault(entry["job_id"], JobTrack(entry["job_id"]))
        track.listed = True
        state = entry.get("state")
        if state in JOB_STATES and track.terminal is None and _later(state, track.state):
            track.state = state


def _later(state: str, than: str | None) -> bool:
    return than is None or JOB_STATES.index(state) >= JOB_STATES.index(than)


def check_answer(track: JobTrack, message: dict[str, Any], session: str) -> list[str]:
    """Record a ``job.accepted`` / ``job.rejected``; the §4 rules it breaks."""
    code = "accepted" if message["type"] == "job.accepted" else str(message["code"])
    out = []
    if len(track.answers) >= track.assigns:
        out.append(f"{message['type']} without a job.assign to answer")
    if code == "accepted" and track.terminal is not None:
        out.append("job.accepted for a job that ended (expected duplicate_job)")
    accepted_and_live = "accepted" in track.answers and track.terminal is None
    if code not in ("accepted", "duplicate_job") and accepted_and_live:
        out.append(f"job.rejected {code} for a job it had accepted")
    track.answers.append(code)
    if code == "accepted":
        track.accepted_session = session
    return [f"{message['type']}: {track.job_id}: {text}" for text in out]


def check_state(
    track: JobTrack, message: dict[str, Any], session: str, results_accepted: bool
) -> list[str]:
    """Record a ``job.state``; the §4 rules it breaks (see the module's docstring)."""
    state = message["state"]
    out = []
    if track.assigns == 0 and not track.listed:
        out.append("job.state for a job this CP never assigned")
    elif "accepted" not in track.answers and not track.listed:
        out.append("job.state before job.accepted")
    new_session = track.state_session != session
    if track.terminal is not None:
        if not _same_end(track.terminal, message):
            out.append(f"{state} after the job ended {track.terminal['state']}")
        elif not new_session:
            out.append(f"terminal state {state} repeated in one session")
    elif state in TERMINAL:
        # A job known only from hello.jobs may have had its results accepted by
        # another control plane: only the CP's own jobs are held to that.
        mine = track.assigns > 0 and not track.listed
        out += _end_problems(message, results_accepted or not mine)
        track.terminal, track.state = copy.deepcopy(message), state
    elif state in ALL_STATES:
        out += _order_problems(track, state, session, new_session)
        if _later(state, track.state):
            track.state = state
    track.state_session = session
    track.states.append(copy.deepcopy(message))
    return [f"job.state: {track.job_id}: {text}" for text in out]


def _order_problems(track: JobTrack, state: str, session: str, new_session: bool) -> list[str]:
    before = track.state
    if before is None:
        if state != "accepted" and track.accepted_session == session:
            return [f"first state is {state}, expected accepted"]
        return []
    if not _later(state, before):
        return [f"{state} after {before}"]
    if not new_session and state != before and state not in _NEXT[before]:
        return [f"{state} after {before} skips a state"]
    return []


def _same_end(first: dict[str, Any], message: dict[str, Any]) -> bool:
    return all(first.get(k) == message.get(k) for k in ("state", "reason", "exit_code"))


def _end_problems(message: dict[str, Any], results_accepted: bool) -> list[str]:
    state, reason, exit_code = message["state"], message.get("reason"), message.get("exit_code")
    out = []
    if state == "succeeded":
        if exit_code != 0:
            out.append(f"succeeded with exit_code {exit_code!r}, expected 0")
        if not results_accepted:
            out.append("succeeded before its results were accepted")
    elif reason == "exit_nonzero" and (exit_code is None or exit_code == 0):
        out.append(f"exit_nonzero with exit_code {exit_code!r}")
    elif reason in _RAN and exit_code is None:
        out.append(f"{reason} without the exit_code of the container that ran")
    elif reason in _NEVER_RAN and exit_code is not None:
        out.append(f"exit_code {exit_code} although the container never ran ({reason})")
    return out
