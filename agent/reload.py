"""What a SIGHUP may change at run time, and what needs a restart. Pure."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agent.config import Config

# Dotted keys whose new value takes effect on reload. Everything else (identity, the
# control-plane connection, the state directory, the health listener, the engine
# address) is bound into long-lived objects at start and needs a restart. A key listed
# here must be read through the daemon's config callable wherever a job uses it (never
# copied at start: agent.jobs.setup), and has a test that a SIGHUP changes the next job
# (tests/unit/test_reload_live.py lists them).
RELOADABLE = (
    "datastores",
    "runtime.allowed_images",
    "runtime.require_digest",
    "runtime.pull",
    "runtime.job_user",
    "runtime.stop_grace_s",
    "gpus",
    "limits",
    "results",
    "models",
    "health.max_disconnected_s",
    "logging",
)


@dataclass(frozen=True)
class ReloadPlan:
    config: Config  # the config to run with: new reloadable values, old everything else
    applied: tuple[str, ...]
    needs_restart: tuple[str, ...]


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else key))
        return out
    return {prefix: data}


def _reloadable(key: str) -> bool:
    return any(key == r or key.startswith(r + ".") for r in RELOADABLE)


def plan_reload(old: Config, new: Config) -> ReloadPlan:
    """Merge ``new`` into ``old`` key by key, keeping the values that need a restart."""
    old_flat, new_flat = _flatten(old.model_dump()), _flatten(new.model_dump())
    changed = sorted(
        k for k in old_flat.keys() | new_flat.keys() if old_flat.get(k) != new_flat.get(k)
    )
    applied = tuple(k for k in changed if _reloadable(k))
    needs_restart = tuple(k for k in changed if not _reloadable(k))
    top_level = {k.split(".")[0] for k in RELOADABLE if "." not in k}
    update: dict[str, Any] = {name: getattr(new, name) for name in top_level}
    update["runtime"] = old.runtime.model_copy(
        update={
            k.split(".", 1)[1]: getattr(new.runtime, k.split(".", 1)[1])
            for k in RELOADABLE
            if k.startswith("runtime.")
        }
    )
    update["health"] = old.health.model_copy(
        update={"max_disconnected_s": new.health.max_disconnected_s}
    )
    return ReloadPlan(old.model_copy(update=update), applied, needs_restart)
