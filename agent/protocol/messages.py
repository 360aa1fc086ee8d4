"""Typed messages of docs/protocol.md and the validation of everything the control plane sends.

Incoming messages are pydantic models in strict mode: a field of the wrong JSON type is
refused (``"5"`` is not ``5``, ``true`` is not ``1``), unknown fields are ignored (§2:
newer control planes may send more). :func:`parse_text` and :func:`parse_binary` turn a
frame into a model or a :class:`Invalid` that says which ``error`` to answer with.

``job.assign`` follows revision 1.1 of docs/protocol.md §4: its models and caps are in
:mod:`agent.protocol.assign` (re-exported here); the frame cap is checked by
:func:`parse_text`, the one place that sees the frame.

Outgoing messages are built by the small functions at the bottom; every one of them is a
JSON object with a string ``type``, exactly the fields of docs/protocol.md and nothing more.

Error details quote field names and what was expected, never the offending value: a
hostile peer must not be able to make the agent echo arbitrary bytes back, and values
may be large. Strings the control plane sends are passed on whole (an artifact name must
match exactly), but anything of theirs that reaches a log line or ``/status`` goes
through :func:`printable` first: at most :data:`MAX_DETAIL` characters, no control
characters.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError

from agent.protocol.assign import (
    _JOB_ID,
    MAX_ASSIGN_FRAME,
    SHA256_HEX,
    KnownJobId,
    NonNegative,
    Number,
    _utf8_bytes,
)

# Re-exported: the job.assign models and 1.1's minimum CPUs, used as m.JobAssign etc.
from agent.protocol.assign import MIN_CPUS as MIN_CPUS
from agent.protocol.assign import ImageAuth as ImageAuth
from agent.protocol.assign import ImageSpec as ImageSpec
from agent.protocol.assign import JobAssign as JobAssign
from agent.protocol.assign import ModelSpec as ModelSpec
from agent.protocol.assign import Resources as Resources
from agent.protocol.assign import StrictMessage as _Incoming
from agent.protocol.frames import BinaryFrame, FrameError, decode_binary, loads

MAX_DETAIL = 300
# welcome.session is shown in /status and in logs: short, printable ASCII.
MAX_SESSION_ID = 128
SESSION_ID_PATTERN = r"^[\x20-\x7e]+$"

# -- control plane → agent ---------------------------------------------------------------


class Welcome(_Incoming):
    type: Literal["welcome"]
    session: Annotated[
        str, Field(min_length=1, max_length=MAX_SESSION_ID, pattern=SESSION_ID_PATTERN)
    ]
    heartbeat_s: Annotated[Number, Field(gt=0)]


class ErrorMessage(_Incoming):
    type: Literal["error"]
    code: str
    detail: str | None = None
    ref: str | None = None


class JobAck(_Incoming):
    type: Literal["job.ack"]
    job_id: KnownJobId


class JobCancel(_Incoming):
    type: Literal["job.cancel"]
    job_id: KnownJobId


class ResultResume(_Incoming):
    type: Literal["result.resume"]
    job_id: KnownJobId
    offsets: list[NonNegative]


class ResultAck(_Incoming):
    type: Literal["result.ack"]
    job_id: KnownJobId
    file: NonNegative
    offset: NonNegative


class ResultAccepted(_Incoming):
    type: Literal["result.accepted"]
    job_id: KnownJobId


class ResultRejected(_Incoming):
    type: Literal["result.rejected"]
    job_id: KnownJobId
    file: NonNegative
    code: str


class ArtifactEnd(_Incoming):
    type: Literal["artifact.end"]
    artifact: str
    size: NonNegative
    sha256: Annotated[str, Field(pattern=SHA256_HEX)]


class ArtifactChunkHeader(_Incoming):
    type: Literal["artifact.chunk"]
    artifact: str
    offset: NonNegative


@dataclass(frozen=True)
class ArtifactChunk:
    header: ArtifactChunkHeader
    payload: bytes | memoryview


TEXT_TYPES: dict[str, type[_Incoming]] = {
    "welcome": Welcome,
    "error": ErrorMessage,
    "job.assign": JobAssign,
    "job.ack": JobAck,
    "job.cancel": JobCancel,
    "result.resume": ResultResume,
    "result.ack": ResultAck,
    "result.accepted": ResultAccepted,
    "result.rejected": ResultRejected,
    "artifact.end": ArtifactEnd,
}
BINARY_TYPES: dict[str, type[_Incoming]] = {"artifact.chunk": ArtifactChunkHeader}

Incoming = (
    Welcome
    | ErrorMessage
    | JobAssign
    | JobAck
    | JobCancel
    | ResultResume
    | ResultAck
    | ResultAccepted
    | ResultRejected
    | ArtifactEnd
    | ArtifactChunk
)


@dataclass(frozen=True)
class Invalid:
    """A frame that must be answered with ``error`` (``code``), or ``job.rejected``.

    ``job_id`` is set for a ``job.assign`` whose ``job_id`` is usable but whose other
    fields are not: docs/protocol.md §4 wants ``job.rejected`` / ``bad_spec`` for it, so that
    the control plane can correlate the refusal.
    """

    code: Literal["bad_message", "unknown_type"]
    detail: str
    ref: str | None = None
    job_id: str | None = None
    field: str | None = None  # the dotted path of the first field refused, if any


def clip(text: str, limit: int = MAX_DETAIL) -> str:
    """``text`` cut to ``limit`` characters (the last one an ellipsis when cut)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def printable(text: str, limit: int = MAX_DETAIL) -> str:
    """A peer's string made fit for a log line or ``/status``: clipped, and every
    control or format character (newlines, escapes, bidi overrides) shown as ``?``."""
    text = clip(text, limit)
    return text if text.isprintable() else "".join(c if c.isprintable() else "?" for c in text)


def describe_validation(exc: ValidationError) -> str:
    """``field.path: what was expected`` for each problem, without the offending values."""
    parts = []
    for error in exc.errors(include_input=False, include_url=False):
        parts.append(f"{_location(error['loc'])}: {error['msg']}")
    return clip("; ".join(parts))


def _location(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(p) for p in loc) or "message"


def _validate(model: type[_Incoming], data: dict[str, Any], kind: str) -> _Incoming | Invalid:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        detail = describe_validation(exc)
        field = clip(_location(exc.errors(include_url=False)[0]["loc"]), 64)
        job_id = _usable_job_id(data) if kind == "job.assign" else None
        return Invalid("bad_message", detail, ref=kind, job_id=job_id, field=field)


def _usable_job_id(data: dict[str, Any]) -> str | None:
    """The top-level ``job_id`` of a parsed ``job.assign`` if it follows §4, else None."""
    job_id = data.get("job_id")
    return job_id if isinstance(job_id, str) and _JOB_ID.fullmatch(job_id) else None


def _over_assign_cap(text: str) -> bool:
    # A character is 1 to 4 bytes: only a text of a quarter of the cap or more can be
    # over it, and only such a text is worth encoding to count.
    return len(text) > MAX_ASSIGN_FRAME or (
        len(text) * 4 > MAX_ASSIGN_FRAME and _utf8_bytes(text) > MAX_ASSIGN_FRAME
    )


def parse_text(text: str) -> Incoming | Invalid:
    """Parse one text frame from the control plane. Never raises.

    A ``job.assign`` frame over :data:`MAX_ASSIGN_FRAME` bytes is refused before its
    fields are validated (validation would copy what the cap is there to refuse). Its
    ``job_id`` is taken the one way every invalid ``job.assign``'s is: the top-level
    field of the JSON object, after a full parse (as any frame up to the transport's
    16 MiB gets; never a scan of the raw text, which a key inside a string or a nested
    object, or a duplicate key, could fool), and only when it follows §4: then it is
    answered ``job.rejected`` / ``bad_spec``, else ``error`` / ``bad_message``.
    """
    try:
        data = loads(text)
    except (ValueError, RecursionError):
        return Invalid("bad_message", "text frame is not JSON")
    if not isinstance(data, dict):
        return Invalid("bad_message", "text frame is not a JSON object")
    kind = data.get("type")
    if not isinstance(kind, str):
        return Invalid("bad_message", "message lacks a string field 'type'")
    model = TEXT_TYPES.get(kind)
    if model is None:
        if kind in BINARY_TYPES:
            # A known type in the wrong kind of frame is a broken peer, not a newer one.
            return Invalid("bad_message", "text frame of a binary type", ref=kind)
        return Invalid("unknown_type", clip(kind), ref=clip(kind))
    if kind == "job.assign" and _over_assign_cap(text):
        detail = f"frame: a job.assign frame holds at most {MAX_ASSIGN_FRAME} bytes"
        return Invalid("bad_message", detail, ref=kind, job_id=_usable_job_id(data), field="frame")
    return _validate(model, data, kind)  # type: ignore[return-value]


def parse_binary(data: bytes) -> Incoming | Invalid:
    """Parse one binary frame from the control plane. Never raises."""
    try:
        frame: BinaryFrame = decode_binary(data)
    except FrameError as exc:
        return Invalid("bad_message", str(exc))
    model = BINARY_TYPES.get(frame.type)
    if model is None:
        if frame.type in TEXT_TYPES:
            # As the reference control plane does for the agent's text types.
            return Invalid("bad_message", "binary frame of a text type", ref=frame.type)
        return Invalid("unknown_type", clip(frame.type), ref=clip(frame.type))
    header = _validate(model, frame.header, frame.type)
    if isinstance(header, Invalid):
        return header
    assert isinstance(header, ArtifactChunkHeader)
    return ArtifactChunk(header, frame.payload)


# -- agent → control plane -------------------------------------------------------------


# One encoder for every text frame (json.dumps with options builds one per call).
_TEXT_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def encode_text(message: dict[str, Any]) -> str:
    """One text frame. ``allow_nan=False``: NaN is not JSON, and a peer may choke on it."""
    return _TEXT_ENCODER.encode(message)


def error(code: str, detail: str | None = None, ref: str | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"type": "error", "code": code}
    if detail is not None:
        message["detail"] = clip(detail)
    if ref is not None:
        message["ref"] = ref
    return message


def job_accepted(job_id: str) -> dict[str, Any]:
    return {"type": "job.accepted", "job_id": job_id}


def job_rejected(job_id: str, code: str, detail: str) -> dict[str, Any]:
    return {"type": "job.rejected", "job_id": job_id, "code": code, "detail": clip(detail)}


def job_state(
    job_id: str,
    state: str,
    ts: float,
    *,
    reason: str | None = None,
    exit_code: int | None = None,
) -> dict[str, Any]:
    message: dict[str, Any] = {"type": "job.state", "job_id": job_id, "state": state, "ts": ts}
    if reason is not None:
        message["reason"] = reason
    if exit_code is not None:
        message["exit_code"] = exit_code
    return message


def hello(
    *,
    node_id: str,
    agent_version: str,
    hostname: str,
    labels: dict[str, str],
    inventory: dict[str, Any],
    datastores: list[dict[str, str]],
    capacity: dict[str, Any],
    jobs: list[dict[str, str]],
    protocol: int = 1,
) -> dict[str, Any]:
    """The ``hello`` of §3. ``datastores`` carry names and descriptions only."""
    return {
        "type": "hello",
        "protocol": protocol,
        "node_id": node_id,
        "agent_version": agent_version,
        "hostname": hostname,
        "labels": labels,
        "inventory": inventory,
        "datastores": datastores,
        "capacity": capacity,
        "jobs": jobs,
    }


def result_manifest(job_id: str, files: list[dict[str, Any]], total_bytes: int) -> dict[str, Any]:
    """``result.manifest`` (§5 step 1); ``files`` are ``{index, path, size, sha256}``."""
    return {"type": "result.manifest", "job_id": job_id, "total_bytes": total_bytes, "files": files}


def result_chunk_header(job_id: str, file: int, offset: int) -> dict[str, Any]:
    """The header of a ``result.chunk`` binary frame (§5 step 3)."""
    return {"type": "result.chunk", "job_id": job_id, "file": file, "offset": offset}


def result_end(job_id: str) -> dict[str, Any]:
    return {"type": "result.end", "job_id": job_id}


def artifact_get(artifact: str, offset: int) -> dict[str, Any]:
    """``artifact.get`` (§6): the artifact from ``offset`` on."""
    return {"type": "artifact.get", "artifact": artifact, "offset": offset}


def heartbeat(seq: int, ts: float, telemetry: dict[str, Any]) -> dict[str, Any]:
    """``heartbeat`` (§3) with the node's telemetry fields."""
    return {"type": "heartbeat", "seq": seq, "ts": ts, **telemetry}
