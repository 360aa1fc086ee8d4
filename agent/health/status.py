"""The ``/status`` document: what a person (or ``cloudbender-agent status``) reads.

It names datastores and describes them, but never shows their host paths or the
control-plane token: with ``health.allow_remote`` this page can be read off the node.
"""

from __future__ import annotations

import platform
import time
from typing import Any
from urllib.parse import urlsplit

from agent import __version__
from agent.config import Config
from agent.health.facts import NodeFacts, Problem
from agent.health.node_rows import node_rows


def _redacted_url(url: str) -> str:
    # A URL may carry credentials or a query with a token in it; show where, not how.
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def _runtime_row(facts: NodeFacts) -> dict[str, Any] | None:
    # hello's runtime object, plus how jobs get their GPUs (legacy, cdi, null) and why.
    rt = facts.runtime
    if rt is None:
        return None
    return {**rt.to_dict(), "gpu_path": rt.gpu_path, "gpu_why": rt.gpu_why}


def status_document(facts: NodeFacts, config: Config, problems: list[Problem]) -> dict[str, Any]:
    now = time.time()
    cp = facts.control_plane
    control_plane: dict[str, Any] = {"state": cp.state}
    if config.control_plane is not None:
        control_plane.update(cp.to_dict(), url=_redacted_url(config.control_plane.url))
    return {
        "node_id": config.node.id,
        "labels": dict(config.node.labels),
        "agent_version": __version__,
        "hostname": platform.node(),
        "started_at": facts.started_at,
        "uptime_s": round(now - facts.started_at, 1),
        "healthy": not problems,
        "problems": [p.to_dict() for p in problems],
        "control_plane": control_plane,
        "gpus": facts.gpus.to_dict() if facts.gpus is not None else None,
        "host": facts.host.to_dict() if facts.host is not None else None,
        "datastores": [{"name": d.name, "description": d.description} for d in config.datastores],
        "runtime": _runtime_row(facts),
        "jobs": [{**job, "age_s": round(now - job["created_at"], 1)} for job in facts.jobs],
        **node_rows(facts, config),
    }
