"""What the agent tells the control plane about this node: ``hello`` and heartbeat bodies.

Built from the daemon's latest facts (docs/protocol.md §3). Datastores are named and
described, never located: no host path leaves the site. A value the hardware cannot
report stays ``None`` (JSON ``null``).
"""

from __future__ import annotations

import platform
from typing import Any

from agent import __version__
from agent.config import Config
from agent.gpu.base import GpuInventory
from agent.health.facts import NodeFacts
from agent.protocol import PROTOCOL_VERSION, messages


def _gpus_for_hello(inventory: GpuInventory | None) -> list[dict[str, Any]]:
    if inventory is None:
        return []
    return [
        {
            "index": gpu.index,
            "uuid": gpu.uuid,
            "name": gpu.name,
            "memory_total_mib": gpu.memory_total_mib,
            "pci_bus_id": gpu.pci_bus_id,
            "driver_version": gpu.driver_version,
            "cuda_version": gpu.cuda_version,
            "health": gpu.health,
            "allocatable": gpu.allocatable,
        }
        for gpu in inventory.gpus
    ]


def hello(
    config: Config,
    facts: NodeFacts,
    jobs: list[dict[str, str]] | None = None,
) -> dict[str, Any]:
    """The ``hello`` for a new session. ``jobs``: unacknowledged jobs and their states."""
    host = facts.host
    return messages.hello(
        protocol=PROTOCOL_VERSION,
        node_id=config.node.id,
        agent_version=__version__,
        hostname=platform.node(),
        labels=dict(config.node.labels),
        inventory={
            "gpus": _gpus_for_hello(facts.gpus),
            "cpu": {
                "logical": host.cpu_logical if host else None,
                "model": host.cpu_model if host else None,
            },
            "memory_total_mib": host.memory_total_mib if host else None,
            "runtime": (
                facts.runtime.to_dict()
                if facts.runtime is not None
                else {"engine": config.runtime.engine, "version": None, "gpu_support": False}
            ),
        },
        datastores=[{"name": d.name, "description": d.description} for d in config.datastores],
        capacity={"max_concurrent_jobs": config.limits.max_concurrent_jobs},
        jobs=list(jobs or []),
    )


def telemetry(facts: NodeFacts, jobs: list[dict[str, str]] | None = None) -> dict[str, Any]:
    """A heartbeat's body, without ``type``, ``seq`` and ``ts`` (the session adds them)."""
    gpus = facts.gpus.gpus if facts.gpus is not None else ()
    host = facts.host
    return {
        "gpus": [
            {
                "uuid": gpu.uuid,
                "utilization_pct": gpu.utilization_pct,
                "memory_used_mib": gpu.memory_used_mib,
                "temperature_c": gpu.temperature_c,
                "power_w": gpu.power_w,
                "health": gpu.health,
            }
            for gpu in gpus
        ],
        "cpu_pct": host.cpu_pct if host else None,
        "memory_used_mib": host.memory_used_mib if host else None,
        "state_dir_free_mib": host.state_dir_free_mib if host else None,
        "jobs": list(jobs or []),
    }
