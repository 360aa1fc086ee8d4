"""The wire protocol (docs/protocol.md), pure: no sockets, no sleeps, no asyncio.

- ``frames``: the binary frame codec of §2.
- ``messages``: typed messages, validation of what the control plane sends.
- ``session``: the agent's side of a session as a state machine.
- ``retry``: backoff delays and the one retry policy.
"""

PROTOCOL_VERSION = 1
SUBPROTOCOL = "cloudbender-agent.v1"
MAX_INCOMING_FRAME = 16 * 1024 * 1024
MAX_CHUNK_PAYLOAD = 1024 * 1024
MAX_HEADER = 4 * 1024
