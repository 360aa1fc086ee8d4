"""The reference control plane: the CP side of docs/protocol.md as a small, real server.

This is an example of the protocol, for the demo, the end-to-end tests and provider
engineers who write their own control plane. It is not a production control plane:
it keeps everything in memory, schedules nothing, and is meant for one process on a
trusted network (loopback, by default).

It is written from docs/protocol.md alone, independently of the agent's own protocol
code, so that the two catch each other's mistakes.

- ``server``: :class:`ControlPlane`, the WebSocket server (upgrade checks, one live
  session per node) and its asyncio API; ``api``: the API's reading, waiting, jobs
  and results half.
- ``auth``: the upgrade gate: path, bearer token, which node_id a token may use.
- ``session``: one connection: the ``hello`` gate, ``welcome``, the receive loop.
- ``handlers``: frame parsing, ``error`` replies, a handler per message type.
- ``validate``: the shape of every message an agent may send. Pure.
- ``state``: :class:`NodeState`, what is recorded per node, and waiting on it.
- ``jobs``: §4 as the CP sees it: ``job.assign`` built, answers and states checked;
  ``assigncheck``: revision 1.1's id pattern and caps, checked before an assign is sent.
- ``results``: §5, receiving results (:class:`ResultStore`); ``upload``: one job's
  upload and :class:`ResultsState`; ``manifest``: manifests checked; ``resultfiles``:
  the files on disk.
- ``artifacts``: §6, model artifacts served.
- ``threaded``: :class:`ThreadedControlPlane`, the same server behind a blocking API.
- ``cli``: ``cloudbender-cp`` (also ``python -m agent.controlplane``): ``serve`` and the
  commands that reach it over ``control``, a Unix socket only its owner can use;
  ``commands``: what each request does; ``jobfile``: the job file, checked strictly.
"""

from agent.controlplane.auth import ANY_NODE
from agent.controlplane.errors import (
    BadAssignment,
    ConditionTimeout,
    ControlPlaneError,
    NodeNotConnected,
)
from agent.controlplane.jobs import TERMINAL as TERMINAL_STATES
from agent.controlplane.jobs import JobTrack
from agent.controlplane.server import CLOSE_AUTH, CLOSE_REPLACED, ControlPlane
from agent.controlplane.session import CLOSE_BAD_HELLO
from agent.controlplane.state import Disconnect, Heartbeat, NodeState, RecordedFrame
from agent.controlplane.threaded import ThreadedControlPlane
from agent.controlplane.upload import ResultsState

__all__ = [
    "ANY_NODE",
    "CLOSE_AUTH",
    "CLOSE_BAD_HELLO",
    "CLOSE_REPLACED",
    "TERMINAL_STATES",
    "BadAssignment",
    "ConditionTimeout",
    "ControlPlane",
    "ControlPlaneError",
    "Disconnect",
    "Heartbeat",
    "JobTrack",
    "NodeNotConnected",
    "NodeState",
    "RecordedFrame",
    "ResultsState",
    "ThreadedControlPlane",
]
