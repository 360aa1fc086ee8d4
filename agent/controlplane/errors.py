"""Errors the reference control plane raises to its caller (a test, the demo).

::

    AgentError
    └── ControlPlaneError
        ├── NodeNotConnected   send/close to a node with no live session
        ├── BadAssignment      assign() of a job that breaks protocol 1.1 §4 (also a ValueError)
        └── ConditionTimeout   a wait_for_* ran out of time (also a TimeoutError)
"""

from __future__ import annotations

from agent.errors import AgentError


class ControlPlaneError(AgentError):
    """Root of the reference control plane's own errors."""


class NodeNotConnected(ControlPlaneError):
    """The node has no live session (never connected, or disconnected)."""


class BadAssignment(ControlPlaneError, ValueError):
    """A ``job.assign`` the API will not send: it breaks 1.1's id pattern or caps.

    ``problems`` lists each rule broken, by field and limit.
    """

    def __init__(self, problems: list[str]) -> None:
        super().__init__("job.assign refused: " + "; ".join(problems))
        self.problems = problems


class ConditionTimeout(ControlPlaneError, TimeoutError):
    """What was waited for did not happen in time; the message says what was seen."""
