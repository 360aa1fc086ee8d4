"""Job states, transitions and reasons (docs/protocol.md §4). Pure.

::

    accepted → [waiting] → preparing → running → [held] → uploading → succeeded
        └──────────┴───────────┴──────────┴─────────┴──────────┴──→ failed | cancelled | timed_out

``waiting`` is entered only when the job cannot start at once, ``held`` only when the
node reviews results (``results.review``, docs/protocol.md §5a, agent.airlock); every
other state is entered in order until the job ends, and a job can end from any state. A
job ends in exactly one terminal state.
"""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    ACCEPTED = "accepted"
    WAITING = "waiting"
    PREPARING = "preparing"
    RUNNING = "running"
    HELD = "held"  # 1.1: results wait for the consumer's review (§5a)
    UPLOADING = "uploading"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({State.SUCCEEDED, State.FAILED, State.CANCELLED, State.TIMED_OUT})
ORDER = (
    State.ACCEPTED,
    State.WAITING,
    State.PREPARING,
    State.RUNNING,
    State.HELD,
    State.UPLOADING,
)
# The optional states, and the state after which each may be skipped.
SKIPPABLE_AFTER = {State.ACCEPTED: State.WAITING, State.RUNNING: State.HELD}

# Failure reasons of docs/protocol.md §4.
FAILURE_REASONS = frozenset(
    {
        "image_unavailable",
        "image_digest_mismatch",
        "model_unavailable",
        "model_checksum_mismatch",
        "container_error",
        "exit_nonzero",
        "oom_killed",
        "result_too_large",
        "result_invalid",
        "container_lost",
        "no_space",
        "result_refused",  # 1.1: the consumer refused the results at review (§5a)
        "review_timeout",  # 1.1: nobody reviewed them in time (§5a)
        "agent_error",
    }
)
TERMINAL_REASON = {
    State.SUCCEEDED: frozenset({"completed"}),
    # cancelled_on_node (1.1): stopped by the consumer's operator, not the CP.
    State.CANCELLED: frozenset({"cancel_requested", "cancelled_on_node"}),
    State.TIMED_OUT: frozenset({"timeout"}),
    State.FAILED: FAILURE_REASONS,
}

REJECTION_CODES = frozenset(
    {
        "bad_spec",
        "unknown_datastore",
        "image_not_allowed",
        "gpu_type_unavailable",
        "limits_exceeded",
        "no_capacity",
        "draining",
        "no_space",
        "runtime_unavailable",  # 1.1: the container engine does not answer
        "duplicate_job",
    }
)


class TransitionError(ValueError):
    """A transition the state machine forbids (a bug in the caller)."""


def check_transition(current: State, new: State, reason: str | None = None) -> None:
    """Raise :class:`TransitionError` unless ``current → new`` is allowed.

    Terminal states need a matching ``reason``; non-terminal ones must move forward
    (``waiting`` and ``held`` may be skipped, nothing else may), and nothing leaves a
    terminal state.
    """
    if current.terminal:
        raise TransitionError(f"job already ended {current.value}")
    if new.terminal:
        if reason not in TERMINAL_REASON[new]:
            raise TransitionError(f"{new.value} cannot have reason {reason!r}")
        return
    if reason is not None:
        raise TransitionError(f"{new.value} is not terminal and takes no reason")
    here, there = ORDER.index(current), ORDER.index(new)
    allowed_next = {here + 1} | ({here + 2} if current in SKIPPABLE_AFTER else set())
    if there not in allowed_next:
        raise TransitionError(f"{current.value} → {new.value} skips or repeats a state")
