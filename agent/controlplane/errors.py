"""Errors the reference control plane raises to its caller (a test, the demo).

::

    AgentError
    └── ControlPlaneError
        ├── NodeNotConnected   send/close to a node with no live session
        └── WaitTimeout        a wait_for_* ran out of time (also a TimeoutError)
"""

from __future__ import annotations

from agent.errors import AgentError


class ControlPlaneError(AgentError):
    """Root of the reference control plane's own errors."""


class NodeNotConnected(ControlPlaneError):
    """The node has no live session (never connected, or disconnected)."""


class WaitTimeout(ControlPlaneError, TimeoutError):
    """What was waited for did not happen in time; the message says what was seen."""
