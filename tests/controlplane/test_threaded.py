"""ThreadedControlPlane: the same server behind a blocking API, for synchronous tests."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from agent.controlplane import (
    CLOSE_REPLACED,
    ConditionTimeout,
    NodeNotConnected,
    ThreadedControlPlane,
)
from agent.protocol import SUBPROTOCOL
from tests.controlplane.wire import CLIENT_LOGGER, NODE, TOKEN, heartbeat, hello
from tests.helpers.env import seconds


@contextmanager
def _connect(cp: ThreadedControlPlane, node_id: str = NODE) -> Iterator[ClientConnection]:
    """A sync client connection past hello/welcome."""
    with connect(
        cp.url,
        subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
        additional_headers={"Authorization": f"Bearer {TOKEN}"},
        open_timeout=seconds(5),
        close_timeout=seconds(2),
        logger=logging.getLogger(CLIENT_LOGGER),
    ) as ws:
        ws.send(json.dumps(hello(node_id)))
        welcome = json.loads(ws.recv(seconds(5)))
        assert welcome["type"] == "welcome"
        yield ws


def _recv(ws: ClientConnection) -> Any:
    return json.loads(ws.recv(seconds(5)))


def test_blocking_api_from_sync_code() -> None:
    with ThreadedControlPlane({TOKEN: "*"}, heartbeat_s=3) as cp:
        assert cp.running and cp.url.startswith("ws://127.0.0.1:")
        with _connect(cp) as ws:
            node = cp.wait_for_node(NODE, seconds(5))
            assert node.connected and node.sent[0]["heartbeat_s"] == 3
            ws.send(json.dumps(heartbeat(1)))
            assert cp.wait_for_message(NODE, "heartbeat", timeout=seconds(5))["seq"] == 1
            cp.send(NODE, {"type": "job.cancel", "job_id": "j-1"})
            assert _recv(ws) == {"type": "job.cancel", "job_id": "j-1"}
            cp.send_raw(NODE, b"\x00\x00\x00\x02{}")
            assert ws.recv(seconds(5)) == b"\x00\x00\x00\x02{}"
            with pytest.raises(ConditionTimeout):
                cp.wait_for_message(NODE, "job.accepted", timeout=seconds(0.1))
            cp.close_node(NODE, 4000, "test")
            with pytest.raises(ConnectionClosed):
                ws.recv(seconds(5))
            assert ws.close_code == 4000
            assert cp.wait_for_disconnect(NODE, seconds(5)).code == 4000
        with pytest.raises(NodeNotConnected):
            cp.send(NODE, {"type": "job.ack", "job_id": "j"})
        assert set(cp.nodes()) == {NODE}
    assert not cp.running


def test_replacement_and_disconnect_all_from_sync_code() -> None:
    with ThreadedControlPlane({TOKEN: "*"}) as cp:
        with _connect(cp) as old, _connect(cp) as new:
            with pytest.raises(ConnectionClosed):
                old.recv(seconds(5))
            assert old.close_code == CLOSE_REPLACED
            cp.disconnect_all(1012, "restart")
            with pytest.raises(ConnectionClosed):
                new.recv(seconds(5))
            assert new.close_code == 1012
        assert [d.code for d in cp.nodes()[NODE].disconnects] == [CLOSE_REPLACED, 1012]


def test_stop_and_restart_on_the_same_port() -> None:
    cp = ThreadedControlPlane({TOKEN: "*"})
    cp.stop()  # stopping a CP that never started does nothing
    cp.start()
    cp.start()
    url = cp.url
    with _connect(cp) as ws:
        cp.stop()
        cp.stop()
        with pytest.raises(ConnectionClosed):
            ws.recv(seconds(5))
        assert ws.close_code == 1001
    assert cp.nodes()[NODE].connected is False  # readable while stopped
    cp.start()
    try:
        assert cp.url == url
        with _connect(cp):
            assert len(cp.wait_for_node(NODE, seconds(5)).sessions) == 2
            # A waiter on the new loop works after the restart.
            with pytest.raises(ConditionTimeout):
                cp.wait_for_message(NODE, "job.state", timeout=seconds(0.1))
    finally:
        cp.stop()


def test_calls_before_start_say_so() -> None:
    cp = ThreadedControlPlane({TOKEN: "*"})
    assert cp.nodes() == {}
    with pytest.raises(RuntimeError, match="not running"):
        cp.send(NODE, {"type": "x"})
