"""docs/protocol.md 1.1's rules for a ``job.assign``, checked before the CP sends one. Pure.

Revision 1.1 gave ``job.assign`` a job id pattern, a minimum ``resources.cpus`` and
size caps; an agent answers ``job.rejected`` / ``bad_spec`` (or, without a usable id,
``error`` / ``bad_message``) to an assignment that breaks them. The CP's API refuses to
create such a job at all (:class:`~agent.controlplane.errors.BadAssignment`): a caller
learns at once, by name, what is wrong, instead of from a rejection later.

Written from docs/protocol.md alone, like the rest of this package, not from the agent's
models: each side catches the other's mistakes. "In all" counts the UTF-8 bytes of the
strings: each ``command`` item; each ``env`` name and value. The frame is measured as
this CP encodes it (compact JSON). Only the rules 1.1 added and the shapes they need
are checked here; the rest (a known datastore, an allowed image) is the node's to decide.
Tests that must send what breaks the rules use ``send_raw`` / ``send``.
"""

from __future__ import annotations

import json
import math
from typing import Any

from agent.controlplane.validate import JOB_ID

MAX_FRAME = 256 * 1024
MAX_COMMAND_ITEMS = 256
MAX_COMMAND_BYTES = 64 * 1024
MAX_ENV_ENTRIES = 256
MAX_ENV_BYTES = 64 * 1024
MAX_GPU_TYPES = 16
MAX_GPU_TYPE_CHARS = 256
MIN_CPUS = 0.01
ENV_NAME_RULE = "[A-Za-z_][A-Za-z0-9_]{0,127}"


def _bytes(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def _is_env_name(name: str) -> bool:
    first, rest = name[:1], name[1:]
    return (
        len(name) <= 128
        and (first == "_" or (first.isascii() and first.isalpha()))
        and all(c == "_" or (c.isascii() and c.isalnum()) for c in rest)
    )


def _command(command: Any) -> list[str]:
    if not isinstance(command, list) or not all(isinstance(a, str) for a in command):
        return ["command must be a list of strings"]
    out = []
    if len(command) > MAX_COMMAND_ITEMS:
        out.append(f"command has {len(command)} items, at most {MAX_COMMAND_ITEMS}")
    if sum(map(_bytes, command)) > MAX_COMMAND_BYTES:
        out.append(f"command holds more than {MAX_COMMAND_BYTES} bytes in all")
    return out


def _env(env: Any) -> list[str]:
    if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
        return ["env must be an object of strings"]
    out = []
    if len(env) > MAX_ENV_ENTRIES:
        out.append(f"env has {len(env)} entries, at most {MAX_ENV_ENTRIES}")
    if not all(_is_env_name(name) for name in env):
        out.append(f"env names must match {ENV_NAME_RULE}")
    if any("\0" in value for value in env.values()):
        out.append("env values must not contain NUL")
    if sum(_bytes(k) + _bytes(v) for k, v in env.items()) > MAX_ENV_BYTES:
        out.append(f"env holds more than {MAX_ENV_BYTES} bytes in all")
    return out


def _gpus(gpus: Any) -> list[str]:
    types = gpus.get("types") if isinstance(gpus, dict) else None
    if types is None:
        return []
    if not isinstance(types, list) or not all(isinstance(t, str) for t in types):
        return ["gpus.types must be a list of strings"]
    out = []
    if len(types) > MAX_GPU_TYPES:
        out.append(f"gpus.types has {len(types)} names, at most {MAX_GPU_TYPES}")
    if any(len(t) > MAX_GPU_TYPE_CHARS for t in types):
        out.append(f"gpus.types names are at most {MAX_GPU_TYPE_CHARS} characters")
    return out


def _cpus(resources: Any) -> list[str]:
    cpus = resources.get("cpus") if isinstance(resources, dict) else None
    if cpus is None or isinstance(cpus, bool) or not isinstance(cpus, (int, float)):
        return []  # absent, or a type the node refuses as bad_spec by itself
    if not (math.isfinite(cpus) and cpus >= MIN_CPUS):
        return [f"resources.cpus must be at least {MIN_CPUS}"]
    return []


def assign_problems(message: dict[str, Any]) -> list[str]:
    """Every 1.1 rule ``message`` (a ``job.assign``) breaks, in words; empty if none.

    The words name the field and the limit; of the values, only counts are quoted.
    """
    job_id = message.get("job_id")
    out = []
    if not isinstance(job_id, str) or not JOB_ID.fullmatch(job_id):
        out.append("job_id must match [A-Za-z0-9][A-Za-z0-9._-]{0,127}")
    if "command" in message:
        out += _command(message["command"])
    if "env" in message:
        out += _env(message["env"])
    out += _gpus(message.get("gpus"))
    out += _cpus(message.get("resources"))
    try:
        size = _bytes(json.dumps(message, separators=(",", ":")))
    except (TypeError, ValueError):
        out.append("the job.assign is not JSON")
    else:
        if size > MAX_FRAME:
            out.append(f"the job.assign frame is {size} bytes, at most {MAX_FRAME}")
    return out
