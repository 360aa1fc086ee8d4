"""A raw websockets client for the reference control plane: no agent code at all.

The agent's side is written separately; these helpers speak PROTOCOL.md by hand so
that the CP is tested on its own terms.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from websockets.asyncio.client import ClientConnection, connect

from agent.controlplane import ControlPlane
from agent.protocol import SUBPROTOCOL
from tests.helpers.env import seconds

T = TypeVar("T")
# The test client's own logger: at DEBUG websockets logs the headers it sends, token
# included. Log assertions look at every other logger (the CP's).
CLIENT_LOGGER = "tests.controlplane.client"
TOKEN = "cp-test-token-5f1c0d6a9b2e4f7a"
NODE = "gpu-node-01"


def hello(node_id: str = NODE, **changes: Any) -> dict[str, Any]:
    """A complete, valid v1 hello (every field of PROTOCOL.md §3)."""
    message: dict[str, Any] = {
        "type": "hello",
        "protocol": 1,
        "node_id": node_id,
        "agent_version": "0.1.0",
        "hostname": "host-a",
        "labels": {"site": "test"},
        "inventory": {
            "gpus": [
                {
                    "index": 0,
                    "uuid": "GPU-0000",
                    "name": "NVIDIA H100 80GB HBM3",
                    "memory_total_mib": 81559,
                    "pci_bus_id": "00000000:18:00.0",
                    "driver_version": "550.54",
                    "cuda_version": "12.4",
                    "health": "ok",
                    "allocatable": True,
                }
            ],
            "cpu": {"logical": 64, "model": "x"},
            "memory_total_mib": 515000,
            "runtime": {"engine": "docker", "version": "27", "gpu_support": True},
        },
        "datastores": [{"name": "vitals", "description": "ICU vitals"}],
        "capacity": {"max_concurrent_jobs": 2},
        "jobs": [],
    }
    message.update(changes)
    return message


def heartbeat(seq: int, **changes: Any) -> dict[str, Any]:
    message: dict[str, Any] = {
        "type": "heartbeat",
        "seq": seq,
        "ts": time.time(),
        "gpus": [
            {
                "uuid": "GPU-0000",
                "utilization_pct": 97,
                "memory_used_mib": 70211,
                "temperature_c": 64,
                "power_w": None,
                "health": "ok",
            }
        ],
        "cpu_pct": 12.5,
        "memory_used_mib": 40960,
        "state_dir_free_mib": 812000,
        "jobs": [],
    }
    message.update(changes)
    return message


def connect_to(
    cp: ControlPlane | str,
    token: str | None = TOKEN,
    subprotocols: list[str] | None = None,
) -> connect:
    """An ``async with``-able client connection, offering the subprotocol by default."""
    url = cp if isinstance(cp, str) else cp.url
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    offered = [SUBPROTOCOL] if subprotocols is None else subprotocols
    return connect(
        url,
        subprotocols=offered or None,  # type: ignore[arg-type]
        additional_headers=headers,
        open_timeout=seconds(5),
        close_timeout=seconds(2),
        logger=logging.getLogger(CLIENT_LOGGER),
    )


async def recv_json(ws: ClientConnection) -> dict[str, Any]:
    async with asyncio.timeout(seconds(5)):
        data = await ws.recv()
    assert isinstance(data, str), data
    message = json.loads(data)
    assert isinstance(message, dict)
    return message


async def send_json(ws: ClientConnection, message: Any) -> None:
    await ws.send(json.dumps(message))


@asynccontextmanager
async def session(
    cp: ControlPlane, node_id: str = NODE, token: str = TOKEN
) -> AsyncIterator[tuple[ClientConnection, dict[str, Any]]]:
    """A connection past hello: yields it and the welcome."""
    async with connect_to(cp, token) as ws:
        await send_json(ws, hello(node_id))
        welcome = await recv_json(ws)
        assert welcome["type"] == "welcome", welcome
        yield ws, welcome


async def closed_code(ws: ClientConnection) -> int | None:
    """Wait for the server to close ``ws``; the close code it sent."""
    async with asyncio.timeout(seconds(5)):
        await ws.wait_closed()
    return ws.close_code


def server_log(records: list[logging.LogRecord]) -> str:
    """Every captured stdlib log line except the test client's."""
    return "\n".join(r.getMessage() for r in records if r.name != CLIENT_LOGGER)


def cp_with(**options: Any) -> ControlPlane:
    options.setdefault("tokens", {TOKEN: "*"})
    return ControlPlane(**options)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)
