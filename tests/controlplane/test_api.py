"""The asyncio API that tests, the demo and provider engineers drive the CP with."""

from __future__ import annotations

import asyncio
import socket

import pytest
from websockets.exceptions import ConnectionClosed

from agent.controlplane import CLOSE_AUTH, ConditionTimeout, NodeNotConnected
from agent.protocol.frames import decode_binary, encode_binary
from tests.controlplane.wire import (
    NODE,
    closed_code,
    connect_to,
    cp_with,
    heartbeat,
    recv_json,
    run,
    send_json,
    session,
)
from tests.helpers.env import free_port, seconds


def test_send_and_send_raw_reach_the_agent_and_are_recorded() -> None:
    async def main() -> None:
        async with cp_with() as cp, session(cp) as (ws, welcome):
            assign = {"type": "job.assign", "job_id": "j-1", "image": {"ref": "x"}}
            await cp.send(NODE, assign)
            assert await recv_json(ws) == assign
            await cp.send_raw(NODE, "not json at all")
            assert await ws.recv() == "not json at all"
            frame = encode_binary({"type": "artifact.chunk", "artifact": "m", "offset": 0}, b"ab")
            await cp.send_raw(NODE, frame)
            data = await ws.recv()
            assert isinstance(data, bytes) and bytes(decode_binary(data).payload) == b"ab"
            assert cp.nodes()[NODE].sent == [welcome, assign]

    run(main())


def test_wait_for_message_predicate_after_index_and_timeout() -> None:
    async def main() -> None:
        async with cp_with() as cp, session(cp) as (ws, _):
            for seq in (1, 2, 3):
                await send_json(ws, heartbeat(seq))
            third = await cp.wait_for_message(NODE, "heartbeat", lambda m: m["seq"] == 3)
            assert third["seq"] == 3
            first = await cp.wait_for_message(NODE, "heartbeat")
            assert first["seq"] == 1
            mark = len(cp.nodes()[NODE].messages)
            with pytest.raises(ConditionTimeout, match="no heartbeat") as info:
                await cp.wait_for_message(NODE, "heartbeat", timeout=seconds(0.2), after_index=mark)
            assert isinstance(info.value, TimeoutError)
            # A waiter already sleeping wakes when the message arrives.
            waiter = asyncio.create_task(
                cp.wait_for_message(NODE, "heartbeat", timeout=seconds(5), after_index=mark)
            )
            await asyncio.sleep(seconds(0.05))
            await send_json(ws, heartbeat(4))
            assert (await waiter)["seq"] == 4

    run(main())


def test_wait_for_node_waits_for_a_later_connection() -> None:
    async def main() -> None:
        async with cp_with() as cp:
            waiter = asyncio.create_task(cp.wait_for_node(NODE, seconds(5)))
            await asyncio.sleep(seconds(0.05))
            assert not waiter.done()
            async with session(cp) as (_, welcome):
                node = await waiter
                assert node.session == welcome["session"]
            with pytest.raises(ConditionTimeout):
                await cp.wait_for_node("nobody", seconds(0.1))

    run(main())


def test_close_node_with_a_protocol_code() -> None:
    async def main() -> None:
        async with cp_with() as cp, session(cp) as (ws, welcome):
            await cp.close_node(NODE, CLOSE_AUTH, "token revoked")
            assert await closed_code(ws) == CLOSE_AUTH
            node = cp.nodes()[NODE]
            assert not node.connected
            [gone] = node.disconnects
            assert (gone.session, gone.code, gone.reason, gone.by) == (
                welcome["session"],
                CLOSE_AUTH,
                "token revoked",
                "cp",
            )
            with pytest.raises(NodeNotConnected):
                await cp.send(NODE, {"type": "job.ack", "job_id": "j"})
            with pytest.raises(NodeNotConnected):
                await cp.close_node(NODE, 1000, "")

    run(main())


def test_disconnect_all_keeps_listening() -> None:
    async def main() -> None:
        async with cp_with() as cp:
            async with session(cp, "a") as (a, _), session(cp, "b") as (b, _):
                await cp.disconnect_all()
                assert await closed_code(a) == 1001
                assert await closed_code(b) == 1001
                assert not any(n.connected for n in cp.nodes().values())
            async with session(cp, "a"):
                assert cp.nodes()["a"].connected

    run(main())


def test_stop_closes_with_1001_and_restart_uses_the_same_port() -> None:
    async def main() -> None:
        cp = cp_with(port=free_port(), heartbeat_s=1)
        await cp.start()
        await cp.start()  # idempotent
        url = cp.url
        async with session(cp) as (ws, _):
            await cp.stop()
            assert await closed_code(ws) == 1001
            await cp.stop()  # idempotent
            with pytest.raises(ConnectionClosed):
                await ws.send("x")
        # The port is free again ...
        with pytest.raises(OSError):
            async with connect_to(url):
                pass
        # ... and a restart serves the same URL; history survives.
        await cp.start()
        try:
            assert cp.url == url
            async with session(cp):
                node = cp.nodes()[NODE]
                assert len(node.sessions) == 2 and node.connected
                assert node.disconnects[0].code == 1001
        finally:
            await cp.stop()
        with socket.create_server(("127.0.0.1", cp.port)):
            pass  # released

    run(main())


def test_port_zero_is_fixed_at_the_first_start() -> None:
    async def main() -> None:
        cp = cp_with()
        assert cp.port == 0
        async with cp:
            port = cp.port
            assert port != 0
        async with cp:
            assert cp.port == port

    run(main())
