"""What an agent may send, checked from docs/protocol.md alone. Pure: no I/O.

Two levels, on purpose:

- :func:`problem` checks field presence and JSON types. A problem there is what §2
  calls "a field of the wrong type": the CP answers ``error`` / ``bad_message``.
- :func:`violations` checks values that docs/protocol.md forbids but that do not stop the
  CP from understanding the message (a GPU health of ``"fine"``, a heartbeat GPU
  without ``uuid``, a datastore that carries a host path). They are recorded on the
  node, where tests assert there are none; the session is not disturbed.

Fields a CP cannot work without are *required* (missing: ``bad_message``). Fields
shown in docs/protocol.md's examples that a CP could do without are *expected* (missing: a
violation). Any present field must have its type. Unknown fields are ignored (§2).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

GPU_HEALTH = frozenset({"ok", "degraded", "lost"})
# In order. "held" (1.1, §5a) comes only on nodes that review results.
JOB_STATES = ("accepted", "waiting", "preparing", "running", "held", "uploading")
TERMINAL_REASONS: Mapping[str, frozenset[str]] = {
    "succeeded": frozenset({"completed"}),
    "cancelled": frozenset({"cancel_requested", "cancelled_on_node"}),
    "timed_out": frozenset({"timeout"}),
    "failed": frozenset(
        {
            "image_unavailable",
            "image_digest_mismatch",
            "model_unavailable",
            "model_checksum_mismatch",
            "container_error",
            "exit_nonzero",
            "oom_killed",
            "result_too_large",
            "result_invalid",
            "container_lost",
            "no_space",
            "result_refused",
            "review_timeout",
            "agent_error",
        }
    ),
}
ALL_STATES = frozenset(JOB_STATES) | frozenset(TERMINAL_REASONS)
REJECTION_CODES = frozenset(
    {
        "bad_spec",
        "unknown_datastore",
        "image_not_allowed",
        "gpu_type_unavailable",
        "limits_exceeded",
        "no_capacity",
        "draining",
        "no_space",
        "runtime_unavailable",
        "duplicate_job",
    }
)
ERROR_CODES = frozenset(
    {
        "bad_message",
        "unknown_type",
        "unknown_job",
        "unknown_artifact",
        "unsupported_protocol",
        "internal",
    }
)
# 1.1 §4: a letter or digit first, so "." and ".." are never job ids.
JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def is_kind(value: Any, kind: str) -> bool:
    """Whether ``value`` has JSON kind ``kind``; a ``?`` suffix also allows null.

    Kinds: ``str``, ``int``, ``number`` (finite), ``bool``, ``object``, ``list``.
    ``true`` is never an int: JSON booleans and numbers are different things.
    """
    if kind.endswith("?"):
        return value is None or is_kind(value, kind[:-1])
    if kind == "str":
        return isinstance(value, str)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        if isinstance(value, float):
            return math.isfinite(value)
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "object":
        return isinstance(value, dict)
    if kind == "list":
        return isinstance(value, list)
    raise ValueError(f"unknown kind {kind!r}")


Checker = Callable[[dict[str, Any]], list[str]]


@dataclass(frozen=True)
class Spec:
    """The shape of one message type the agent sends."""

    fields: Mapping[str, str]
    required: frozenset[str]
    expected: frozenset[str] = frozenset()
    binary: bool = False
    check: Checker | None = None


def problem(message: Mapping[str, Any], spec: Spec) -> str | None:
    """The first presence/type problem of ``message``, or ``None`` when there is none."""
    if not spec.required <= message.keys():
        missing = sorted(spec.required - message.keys())
        return f"missing field {missing[0]!r}"
    for name, kind in spec.fields.items():
        if name in message and not is_kind(message[name], kind):
            return f"field {name!r} must be {_describe(kind)}"
    return None


def violations(type_: str, message: dict[str, Any], spec: Spec) -> list[str]:
    """Everything in an (already type-checked) message that docs/protocol.md forbids."""
    found = [f"{type_}: missing field {name!r}" for name in sorted(spec.expected - message.keys())]
    if spec.check is not None:
        found += [f"{type_}: {text}" for text in spec.check(message)]
    return found


def _describe(kind: str) -> str:
    base = kind.rstrip("?")
    article = "an" if base[0] in "aeiou" else "a"
    text = f"{article} {base}" if base != "object" else "a JSON object"
    return text + (" or null" if kind.endswith("?") else "")


def _shape(where: str, value: Any, fields: Mapping[str, str]) -> list[str]:
    """Check a nested object: every listed field present and of its kind."""
    if not isinstance(value, dict):
        return [f"{where} must be a JSON object"]
    out = []
    for name, kind in fields.items():
        if name not in value:
            out.append(f"{where}.{name} is missing")
        elif not is_kind(value[name], kind):
            out.append(f"{where}.{name} must be {_describe(kind)}")
    return out


def _jobs(where: str, jobs: list[Any]) -> list[str]:
    out = []
    for i, job in enumerate(jobs):
        out += _shape(f"{where}[{i}]", job, {"job_id": "str", "state": "str"})
        state = job.get("state") if isinstance(job, dict) else None
        if isinstance(state, str) and state not in ALL_STATES:
            out.append(f"{where}[{i}].state {state!r} is not a job state")
    return out


def _hello(msg: dict[str, Any]) -> list[str]:
    out = []
    labels = msg.get("labels", {})
    if isinstance(labels, dict) and not all(isinstance(v, str) for v in labels.values()):
        out.append("labels values must be strings")
    inventory = msg.get("inventory")
    if isinstance(inventory, dict):
        gpus = inventory.get("gpus")
        if not isinstance(gpus, list):
            out.append("inventory.gpus must be a list")
            gpus = []
        gpu_fields = {"index": "int", "uuid": "str", "name": "str?", "memory_total_mib": "int?"}
        gpu_fields |= {"health": "str", "allocatable": "bool"}
        for i, gpu in enumerate(gpus):
            where = f"inventory.gpus[{i}]"
            out += _shape(where, gpu, gpu_fields)
            if isinstance(gpu, dict) and gpu.get("health") not in GPU_HEALTH:
                out.append(f"{where}.health {gpu.get('health')!r} is not one of ok/degraded/lost")
            elif isinstance(gpu, dict) and gpu["health"] != "ok" and gpu.get("allocatable"):
                out.append(f"{where} is allocatable although its health is {gpu['health']}")
        for name in ("cpu", "runtime"):
            if not isinstance(inventory.get(name), dict):
                out.append(f"inventory.{name} must be a JSON object")
        if not is_kind(inventory.get("memory_total_mib"), "int?"):
            out.append("inventory.memory_total_mib must be an int or null")
    for i, store in enumerate(msg.get("datastores", [])):
        out += _shape(f"datastores[{i}]", store, {"name": "str", "description": "str?"})
        # §3: names and descriptions only, never host paths.
        if isinstance(store, dict) and "path" in store:
            out.append(f"datastores[{i}] carries a 'path'")
    capacity = msg.get("capacity", {})
    if isinstance(capacity, dict) and not is_kind(capacity.get("max_concurrent_jobs"), "int"):
        out.append("capacity.max_concurrent_jobs must be an int")
    return out + _jobs("jobs", msg.get("jobs", []))


def _heartbeat(msg: dict[str, Any]) -> list[str]:
    out = []
    metrics = {"utilization_pct": "number?", "memory_used_mib": "number?"}
    metrics |= {"temperature_c": "number?", "power_w": "number?"}
    for i, gpu in enumerate(msg.get("gpus", [])):
        out += _shape(f"gpus[{i}]", gpu, {"uuid": "str", **metrics, "health": "str"})
        if isinstance(gpu, dict) and gpu.get("health") not in GPU_HEALTH:
            out.append(f"gpus[{i}].health {gpu.get('health')!r} is not one of ok/degraded/lost")
    return out + _jobs("jobs", msg.get("jobs", []))


def _job_id(msg: dict[str, Any]) -> list[str]:
    return [] if JOB_ID.fullmatch(msg["job_id"]) else [f"job_id {msg['job_id']!r} is malformed"]


def _job_state(msg: dict[str, Any]) -> list[str]:
    out = _job_id(msg)
    state = msg["state"]
    if state not in ALL_STATES:
        return [*out, f"state {state!r} is not a job state"]
    if state in TERMINAL_REASONS and msg.get("reason") not in TERMINAL_REASONS[state]:
        out.append(f"terminal state {state!r} has reason {msg.get('reason')!r}")
    return out


def _job_rejected(msg: dict[str, Any]) -> list[str]:
    out = _job_id(msg)
    if msg["code"] not in REJECTION_CODES:
        out.append(f"rejection code {msg['code']!r} is not in §4")
    return out


def _error(msg: dict[str, Any]) -> list[str]:
    return [] if msg["code"] in ERROR_CODES else [f"error code {msg['code']!r} is not in §8"]


def _spec(fields: dict[str, str], required: str, expected: str = "", **kw: Any) -> Spec:
    return Spec(fields, frozenset(required.split()), frozenset(expected.split()), **kw)


# What the agent may send. Later issues attach behaviour in handlers.py; the shapes
# live here so that every message is checked the same way, handled or not.
AGENT_MESSAGES: Mapping[str, Spec] = {
    "hello": _spec(
        {"protocol": "int", "node_id": "str", "agent_version": "str", "hostname": "str"}
        | {"labels": "object", "inventory": "object", "datastores": "list"}
        | {"capacity": "object", "jobs": "list"},
        "protocol node_id",
        "agent_version hostname labels inventory datastores capacity jobs",
        check=_hello,
    ),
    "heartbeat": _spec(
        {"seq": "int", "ts": "number", "gpus": "list", "cpu_pct": "number?"}
        | {"memory_used_mib": "number?", "state_dir_free_mib": "number?", "jobs": "list"},
        "seq ts",
        "gpus cpu_pct memory_used_mib state_dir_free_mib jobs",
        check=_heartbeat,
    ),
    "job.accepted": _spec({"job_id": "str"}, "job_id", check=_job_id),
    "job.rejected": _spec(
        {"job_id": "str", "code": "str", "detail": "str"}, "job_id code", check=_job_rejected
    ),
    "job.state": _spec(
        {"job_id": "str", "state": "str", "ts": "number", "reason": "str", "exit_code": "int?"},
        "job_id state ts",
        check=_job_state,
    ),
    "result.manifest": _spec(
        {"job_id": "str", "total_bytes": "int", "files": "list"},
        # Its values are checked by manifest.parse(): a wrong one is bad_message.
        "job_id total_bytes files",
    ),
    "result.end": _spec({"job_id": "str"}, "job_id", check=_job_id),
    "result.chunk": _spec(
        {"job_id": "str", "file": "int", "offset": "int"}, "job_id file offset", binary=True
    ),
    "artifact.get": _spec({"artifact": "str", "offset": "int"}, "artifact offset"),
    "error": _spec({"code": "str", "detail": "str", "ref": "str"}, "code", check=_error),
}

# What only the CP sends. From an agent these are a bug, not a newer peer: answered
# bad_message (with ref), not unknown_type.
CP_MESSAGES = frozenset(
    {
        "welcome",
        "job.assign",
        "job.ack",
        "job.cancel",
        "result.resume",
        "result.ack",
        "result.accepted",
        "result.rejected",
        "artifact.chunk",
        "artifact.end",
    }
)
