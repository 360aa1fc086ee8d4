"""The upgrade (PROTOCOL.md §1): path, bearer token, subprotocol, node_id per token."""

from __future__ import annotations

import logging

import pytest
import structlog
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Subprotocol

from agent.controlplane import CLOSE_AUTH, ControlPlane
from agent.protocol import SUBPROTOCOL
from tests.controlplane.wire import (
    CLIENT_LOGGER,
    NODE,
    TOKEN,
    closed_code,
    connect_to,
    cp_with,
    hello,
    recv_json,
    run,
    send_json,
    server_log,
    session,
)
from tests.helpers.env import seconds


def test_valid_token_subprotocol_and_hello_get_a_welcome() -> None:
    async def main() -> None:
        async with cp_with(heartbeat_s=7) as cp:
            assert cp.url == f"ws://127.0.0.1:{cp.port}/agent/v1"
            async with session(cp) as (ws, welcome):
                assert ws.subprotocol == SUBPROTOCOL
                assert welcome["heartbeat_s"] == 7
                assert isinstance(welcome["session"], str) and welcome["session"]
                node = await cp.wait_for_node(NODE, seconds(5))
                assert node.connected and node.session == welcome["session"]
                assert node.hello == hello()
                assert [m.type for m in node.messages] == ["hello"]
                assert node.sent == [welcome]
                assert node.violations == []

    run(main())


def test_each_session_gets_a_fresh_id() -> None:
    async def main() -> None:
        async with cp_with() as cp:
            async with session(cp) as (_, first):
                pass
            async with session(cp) as (_, second):
                pass
            assert first["session"] != second["session"]
            assert cp.nodes()[NODE].sessions == [first["session"], second["session"]]

    run(main())


@pytest.mark.parametrize(
    "header",
    [None, "Bearer wrong-token-0000000000", "Basic " + TOKEN, TOKEN, "Bearer "],
    ids=["none", "unknown", "basic-scheme", "no-scheme", "empty"],
)
def test_refused_token_is_http_401_and_never_logged(
    header: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)

    async def main() -> None:
        async with cp_with() as cp:
            headers = {} if header is None else {"Authorization": header}
            client = connect(
                cp.url,
                subprotocols=[Subprotocol(SUBPROTOCOL)],
                additional_headers=headers,
                logger=logging.getLogger(CLIENT_LOGGER),
            )
            with structlog.testing.capture_logs() as events, pytest.raises(InvalidStatus) as info:
                await client
            assert info.value.response.status_code == 401
            assert TOKEN.encode() not in info.value.response.body
            assert TOKEN not in repr(events)
            assert any(e["event"] == "cp.auth_refused" for e in events)
            assert cp.nodes() == {}

    run(main())
    assert TOKEN not in server_log(caplog.records)


def test_accepted_token_is_not_logged_even_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)

    async def main() -> None:
        with structlog.testing.capture_logs() as events:
            async with cp_with() as cp, session(cp):
                pass
        assert TOKEN not in repr(events)

    run(main())
    # websockets logged the request headers: the redaction, not silence, kept it out.
    text = server_log(caplog.records)
    assert "Authorization: [redacted]" in text
    assert TOKEN not in text


def test_other_paths_are_404() -> None:
    async def main() -> None:
        async with cp_with() as cp:
            with pytest.raises(InvalidStatus) as info:
                async with connect_to(cp.url.replace("/agent/v1", "/agent/v2")):
                    pass
            assert info.value.response.status_code == 404

    run(main())


@pytest.mark.parametrize("offered", [[], ["other.v1"]], ids=["none", "other"])
def test_client_without_the_subprotocol_is_refused(offered: list[str]) -> None:
    async def main() -> None:
        async with cp_with() as cp:
            with pytest.raises(InvalidStatus) as info:
                async with connect_to(cp, subprotocols=offered):
                    pass
            assert info.value.response.status_code == 400
            assert cp.nodes() == {}

    run(main())


def test_select_subprotocol_false_accepts_without_selecting() -> None:
    async def main() -> None:
        async with cp_with(select_subprotocol=False) as cp, connect_to(cp) as ws:
            # The upgrade succeeded but nothing was selected: the agent must refuse.
            assert ws.subprotocol is None

    run(main())


def test_token_bound_to_another_node_gets_4401() -> None:
    async def main() -> None:
        async with cp_with(tokens={TOKEN: "other-node"}) as cp, connect_to(cp) as ws:
            await send_json(ws, hello(NODE))
            assert await closed_code(ws) == CLOSE_AUTH
            assert cp.nodes() == {}

    run(main())


def test_token_bound_to_this_node_and_callable_tokens() -> None:
    seen: list[str] = []

    def lookup(token: str) -> str | None:
        seen.append(token)
        return NODE if token == TOKEN else None

    async def main() -> None:
        async with cp_with(tokens={TOKEN: NODE}) as cp, session(cp):
            pass
        async with ControlPlane(lookup) as cp:
            async with session(cp):
                pass
            with pytest.raises(InvalidStatus):
                async with connect_to(cp, token="nope-nope-nope"):
                    pass

    run(main())
    assert seen == [TOKEN, "nope-nope-nope"]


def test_hello_timeout_closes_the_connection() -> None:
    async def main() -> None:
        async with cp_with(hello_timeout_s=seconds(0.2)) as cp, connect_to(cp) as ws:
            assert await closed_code(ws) == 1008

    run(main())


def test_first_frame_must_be_hello_then_close_1008() -> None:
    async def main() -> None:
        async with cp_with() as cp, connect_to(cp) as ws:
            await send_json(ws, {"type": "heartbeat", "seq": 1, "ts": 1.0})
            reply = await recv_json(ws)
            assert reply["type"] == "error" and reply["code"] == "bad_message"
            assert reply["ref"] == "heartbeat"
            assert await closed_code(ws) == 1008
            assert cp.nodes() == {}

    run(main())
