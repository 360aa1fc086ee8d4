"""hello / welcome / heartbeat (PROTOCOL.md §3), one session per node, and §8 errors."""

from __future__ import annotations

from typing import Any

import pytest

from agent.controlplane import CLOSE_BAD_HELLO, CLOSE_REPLACED
from tests.controlplane.wire import (
    NODE,
    closed_code,
    connect_to,
    cp_with,
    heartbeat,
    hello,
    recv_json,
    run,
    send_json,
    session,
)
from tests.helpers.env import seconds


def test_hello_with_another_protocol_gets_unsupported_protocol_then_close() -> None:
    async def main() -> None:
        async with cp_with() as cp, connect_to(cp) as ws:
            # A v2 hello may look different: only its protocol is looked at.
            await send_json(ws, {"type": "hello", "protocol": 2, "node_id": NODE, "new": {}})
            reply = await recv_json(ws)
            assert reply["type"] == "error" and reply["code"] == "unsupported_protocol"
            assert await closed_code(ws) == CLOSE_BAD_HELLO
            assert cp.nodes() == {}

    run(main())


def test_protocol_versions_option() -> None:
    async def main() -> None:
        async with cp_with(protocol_versions={2}) as cp, connect_to(cp) as ws:
            await send_json(ws, hello())
            assert (await recv_json(ws))["code"] == "unsupported_protocol"

    run(main())


@pytest.mark.parametrize(
    "changes",
    [
        {"protocol": "1"},
        {"protocol": True},
        {"node_id": 7},
        {"node_id": None},
        {"node_id": ""},
        {"inventory": []},
        {"datastores": {}},
        {"jobs": "none"},
        {"labels": "x"},
    ],
    ids=lambda c: next(iter(c)) + "=" + repr(next(iter(c.values()))),
)
def test_hello_with_wrong_field_types_is_bad_message_and_1008(changes: dict[str, Any]) -> None:
    async def main() -> None:
        async with cp_with() as cp, connect_to(cp) as ws:
            await send_json(ws, hello(**changes))
            reply = await recv_json(ws)
            assert reply["code"] == "bad_message" and reply["ref"] == "hello", reply
            assert await closed_code(ws) == CLOSE_BAD_HELLO
            assert cp.nodes() == {}

    run(main())


@pytest.mark.parametrize("first", ["not json", "[1]", '{"no": "type"}', b"\x00\x00"])
def test_unparseable_first_frame_is_bad_message_and_1008(first: str | bytes) -> None:
    async def main() -> None:
        async with cp_with() as cp, connect_to(cp) as ws:
            await ws.send(first)
            assert (await recv_json(ws))["code"] == "bad_message"
            assert await closed_code(ws) == CLOSE_BAD_HELLO

    run(main())


def test_hello_missing_expected_fields_is_welcomed_with_violations() -> None:
    async def main() -> None:
        minimal = {"type": "hello", "protocol": 1, "node_id": NODE}
        bad_gpu = hello()
        bad_gpu["inventory"]["gpus"][0]["health"] = "fine"
        bad_gpu["datastores"][0]["path"] = "/srv/data/vitals"
        async with cp_with() as cp:
            for message in (minimal, bad_gpu):
                async with connect_to(cp) as ws:
                    await send_json(ws, message)
                    assert (await recv_json(ws))["type"] == "welcome"
            violations = cp.nodes()[NODE].violations
        assert "hello: missing field 'inventory'" in violations
        assert any("health 'fine'" in v for v in violations)
        assert any("carries a 'path'" in v for v in violations)

    run(main())


def test_second_connection_replaces_the_first_with_4409() -> None:
    async def main() -> None:
        async with cp_with() as cp, session(cp) as (old, first), session(cp) as (new, second):
            assert await closed_code(old) == CLOSE_REPLACED
            assert old.close_reason == "replaced"
            gone = await cp.registry.wait_until(
                lambda: next(iter(cp.registry.get(NODE).disconnects), None),  # type: ignore[union-attr]
                seconds(5),
                lambda: "old session not recorded as closed",
            )
            assert (gone.session, gone.code, gone.by) == (first["session"], 4409, "cp")
            node = cp.nodes()[NODE]
            assert node.connected and node.session == second["session"]
            # The survivor is the live session.
            await send_json(new, heartbeat(1))
            await cp.wait_for_message(NODE, "heartbeat", timeout=seconds(5))
            assert cp.nodes()[NODE].heartbeats[-1].session == second["session"]

    run(main())


def test_heartbeats_are_recorded_and_seq_checked_per_session() -> None:
    async def main() -> None:
        async with cp_with() as cp:
            async with session(cp) as (ws, _):
                for seq in (1, 2, 3):
                    await send_json(ws, heartbeat(seq))
                await cp.wait_for_message(NODE, "heartbeat", lambda m: m["seq"] == 3)
                assert cp.nodes()[NODE].violations == []
            # A new session starts again at 1.
            async with session(cp) as (ws, _):
                start = len(cp.nodes()[NODE].messages)  # this session's hello is before
                for seq in (1, 2, 4, 4):
                    await send_json(ws, heartbeat(seq))
                # The second seq-4 heartbeat: the fourth message from `start` on.
                await cp.wait_for_message(NODE, "heartbeat", after_index=start + 3)
            node = cp.nodes()[NODE]
        assert [h.seq for h in node.heartbeats] == [1, 2, 3, 1, 2, 4, 4]
        assert node.violations == [
            "heartbeat: seq 4, expected 3",
            "heartbeat: seq 4, expected 5",
        ]

    run(main())


def test_heartbeat_with_bad_contents_is_a_violation_not_an_error() -> None:
    async def main() -> None:
        async with cp_with() as cp, session(cp) as (ws, _):
            gpu = {"uuid": "GPU-0", "utilization_pct": "97%", "health": "ok"}
            await send_json(ws, heartbeat(1, gpus=[gpu]))
            await send_json(ws, heartbeat(2))
            await cp.wait_for_message(NODE, "heartbeat", lambda m: m["seq"] == 2)
            violations = cp.nodes()[NODE].violations
        assert "heartbeat: gpus[0].utilization_pct must be a number or null" in violations
        assert "heartbeat: gpus[0].memory_used_mib is missing" in violations

    run(main())


def test_agent_close_and_errors_are_recorded() -> None:
    async def main() -> None:
        async with cp_with() as cp:
            async with session(cp) as (ws, welcome):
                await send_json(ws, {"type": "error", "code": "unknown_job", "detail": "j-9"})
                await cp.wait_for_message(NODE, "error")
                await ws.close(1000, "bye")
            gone = await cp.wait_for_disconnect(NODE, seconds(5))
            node = cp.nodes()[NODE]
        assert node.errors == [{"type": "error", "code": "unknown_job", "detail": "j-9"}]
        assert node.disconnects == [gone]
        assert not node.connected
        assert (gone.session, gone.code, gone.reason, gone.by) == (
            welcome["session"],
            1000,
            "bye",
            "agent",
        )

    run(main())
