"""The operator's rows of ``/status``: engine, job slots, draining, pending restart, token.

Kept apart from :mod:`agent.health.status` so that each stays one screenful. Pure but
for :func:`token_fingerprint`, which reads the token file.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable
from typing import Any

from agent.config import Config
from agent.health.facts import NodeFacts
from agent.jobs.model import TERMINAL
from agent.token_file import TokenFileError, read_token

# Hex digits of the token's SHA-256 that ``status`` shows: enough for a person to tell
# two tokens apart over the phone, far too few to help anyone guess the token.
FINGERPRINT_HEX = 12


def fingerprint(token: str) -> str:
    """``sha256:`` and the first :data:`FINGERPRINT_HEX` hex digits of the token's
    SHA-256 (UTF-8). The provider computes the same from the token it issued."""
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()[:FINGERPRINT_HEX]


def token_fingerprint(config: Config) -> dict[str, Any] | None:
    """The fingerprint of the token the next dial presents (the token file is read at
    every dial), or why there is none; None without a control plane. Never the token,
    nor any of its text in an error."""
    if config.control_plane is None:
        return None
    try:
        token = read_token(config.control_plane.token_file)
    except TokenFileError as exc:
        return {"fingerprint": None, "error": str(exc)}
    return {"fingerprint": fingerprint(token), "error": None}


def slots(jobs: Iterable[dict[str, Any]], total: int) -> dict[str, int]:
    """Job slots held (jobs accepted and not yet ended) and free, of ``total``."""
    terminal = {s.value for s in TERMINAL}
    used = sum(1 for job in jobs if job.get("state") not in terminal)
    return {"used": used, "free": max(total - used, 0), "total": total}


def node_rows(facts: NodeFacts, config: Config) -> dict[str, Any]:
    """The keys these rows add to the ``/status`` document."""
    runtime = facts.runtime
    engine: dict[str, Any] | None = None
    if runtime is not None:
        engine = {
            "engine": runtime.engine,
            "up": runtime.reachable,
            "version": runtime.version,
            "error": runtime.error,
        }
    return {
        "engine": engine,
        "slots": slots(facts.jobs, config.limits.max_concurrent_jobs),
        "draining": bool(getattr(facts, "draining", False)),
        "pending_restart": list(getattr(facts, "pending_restart", ())),
        "token": token_fingerprint(config),
        "held": held(facts.jobs, time.time()),
    }


def held(jobs: Iterable[dict[str, Any]], now: float) -> dict[str, Any]:
    """Jobs whose results wait for review (docs/airlock.md), and the longest wait in
    seconds (0 when none is held). Shared by ``/status`` and the metrics."""
    since = [float(j.get("state_since") or now) for j in jobs if j.get("state") == "held"]
    return {"count": len(since), "oldest_s": max((now - s for s in since), default=0.0)}


def render_node_rows(doc: dict[str, Any]) -> list[str]:
    """Lines for ``status``; each is escaped by the caller."""
    lines = []
    engine = doc.get("engine")
    if engine:
        if engine.get("up"):
            state = f"up, {engine.get('engine')} {engine.get('version') or 'version unknown'}"
        else:
            state = f"DOWN ({engine.get('error') or 'no answer'})"
        lines.append(f"{'Engine':<14} {state}")
    slot = doc.get("slots")
    if slot:
        lines.append(
            f"{'Job slots':<14} {slot.get('used')} used, {slot.get('free')} free "
            f"(of {slot.get('total')})"
        )
    if "draining" in doc:
        draining = "yes: new jobs are refused, running ones finish" if doc["draining"] else "no"
        lines.append(f"{'Draining':<14} {draining}")
    if "pending_restart" in doc:
        keys = doc.get("pending_restart") or []
        pending = f"yes, for {', '.join(map(str, keys))}" if keys else "no"
        lines.append(f"{'Restart needed':<14} {pending}")
    review = doc.get("held")
    if review and review.get("count"):
        minutes = int(float(review.get("oldest_s") or 0) // 60)
        lines.append(
            f"{'Held results':<14} {review.get('count')} job(s), the oldest waiting "
            f"{minutes // 60}h{minutes % 60:02d}m (cloudbender-agent review list)"
        )
    token = doc.get("token")
    if token:
        shown = token.get("fingerprint") or f"unreadable ({token.get('error')})"
        lines.append(f"{'Token':<14} {shown}")
    return lines
