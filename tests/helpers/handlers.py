"""A session handler that does nothing, for tests of the link alone."""

from __future__ import annotations

from agent.link import Link
from agent.protocol import messages
from agent.protocol.session import PeerError


class QuietHandler:
    """Knows no jobs, answers nothing: what remains is the connection's own behaviour."""

    def hello_jobs(self) -> list[dict[str, str]]:
        return []

    async def on_established(self, link: Link) -> None:
        return None

    async def on_message(self, link: Link, message: messages.Incoming) -> None:
        return None

    async def on_invalid_assignment(self, link: Link, job_id: str, detail: str) -> None:
        return None

    async def on_peer_error(self, link: Link, error: PeerError) -> None:
        return None

    def on_closed(self) -> None:
        return None
