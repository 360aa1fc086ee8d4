"""Turning the agent's frames into recorded messages, error replies and handler calls.

One entry point, :func:`dispatch`, for every frame after ``hello``; a handler per
message type in :data:`HANDLERS`. A type without a handler is only checked and
recorded. Jobs (§4): answers and states are checked against the job's history by
:mod:`~agent.controlplane.jobs`. Results (§5): received by
:class:`~agent.controlplane.results.ResultStore`. Artifacts (§6): ``artifact.get`` is
answered from :class:`~agent.controlplane.artifacts.ArtifactStore`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from agent.controlplane import artifacts, jobs, validate
from agent.controlplane.errors import ControlPlaneError
from agent.controlplane.results import ResultStore
from agent.controlplane.state import ArtifactRequest, Registry
from agent.protocol import MAX_HEADER
from agent.protocol.frames import LENGTH_PREFIX, FrameError, decode_binary, loads


class Context(Protocol):
    """What a handler may use: the session it runs in and the node's record."""

    node_id: str
    session_id: str
    registry: Registry
    artifacts: artifacts.ArtifactStore
    results: ResultStore
    auto_ack: bool
    next_seq: int

    async def send(self, message: dict[str, Any]) -> None:
        """Send one text message to the agent, recording it on the node."""

    async def send_raw(self, data: str | bytes) -> None:
        """Send one frame as given, unrecorded (bulk binary frames)."""

    async def drop(self) -> None:
        """Close the connection (a test fault)."""

    async def abort(self) -> None:
        """End the connection without a closing handshake, as a network failure would."""


Handler = Callable[[Context, dict[str, Any], memoryview | None], Awaitable[None]]


class BadFrame(ControlPlaneError):
    """A frame that gets an ``error`` reply. Never leaves this package."""

    def __init__(self, reply: dict[str, Any]) -> None:
        super().__init__(reply["detail"])
        self.reply = reply


def error(code: str, detail: str, ref: str | None = None) -> dict[str, Any]:
    """An ``error`` message (§8); ``ref`` names the type of the message answered."""
    message: dict[str, Any] = {"type": "error", "code": code, "detail": detail}
    if ref is not None:
        message["ref"] = ref
    return message


def parse_text(text: str) -> dict[str, Any]:
    """The JSON object in a text frame. Raises :class:`BadFrame` (``bad_message``)."""
    try:
        # NaN and Infinity are Python's extensions, not JSON; a ts of NaN is no time.
        message = loads(text)
    except (ValueError, RecursionError) as exc:
        raise BadFrame(error("bad_message", "text frame is not JSON")) from exc
    if not isinstance(message, dict):
        raise BadFrame(error("bad_message", "text frame is not a JSON object"))
    if not isinstance(message.get("type"), str):
        raise BadFrame(error("bad_message", "message lacks a string field 'type'"))
    return message


def parse_binary(data: bytes) -> tuple[dict[str, Any], memoryview]:
    """Header and payload of a binary frame, the payload a view into ``data`` (a copy of
    every MiB received would cost as much as hashing it). Raises :class:`BadFrame`."""
    try:
        frame = decode_binary(data)
    except (FrameError, RecursionError) as exc:
        # FrameError texts describe the frame only, never its content.
        raise BadFrame(error("bad_message", f"bad binary frame: {exc}")) from exc
    return frame.header, memoryview(frame.payload)


def _check(type_: str, message: dict[str, Any], binary: bool) -> dict[str, Any] | None:
    """The ``error`` reply a well-framed message deserves, or ``None`` if it is fine."""
    spec = validate.AGENT_MESSAGES.get(type_)
    if spec is None:
        if type_ in validate.CP_MESSAGES:
            return error("bad_message", f"{type_} is sent by the control plane", type_)
        return error("unknown_type", type_, type_)
    if spec.binary != binary:
        kind = "binary" if spec.binary else "text"
        return error("bad_message", f"{type_} must be a {kind} frame", type_)
    if type_ == "hello":
        return error("bad_message", "hello was already received in this session", type_)
    problem = validate.problem(message, spec)
    return None if problem is None else error("bad_message", problem, type_)


async def dispatch(ctx: Context, data: str | bytes) -> None:
    """Record one frame received after ``hello`` and act on it.

    Frames that break §2 are answered with ``error`` and recorded as violations on
    the node; the session goes on. Raises only what ``ctx.send`` raises (the
    connection closing); the caller turns any other exception into ``internal``.
    """
    reg = ctx.registry
    payload: memoryview | None = None
    try:
        if isinstance(data, bytes):
            message, payload = parse_binary(data)
        else:
            message = parse_text(data)
    except BadFrame as bad:
        reg.violation(ctx.node_id, f"frame: {bad.reply['detail']}")
        await ctx.send(bad.reply)
        return
    type_ = message["type"]
    if payload is not None and (header := len(data) - len(payload) - LENGTH_PREFIX) > MAX_HEADER:
        # §2: a header of at most 4 KiB. The frame was accepted (it fits max_size): the
        # bytes are usable, the header's size is only recorded.
        reg.violation(ctx.node_id, f"{type_}: header of {header} bytes")
    reply = _check(type_, message, binary=payload is not None)
    reg.received(
        ctx.node_id,
        ctx.session_id,
        type_,
        message,
        # Result bytes are kept once, as files (ResultStore), not in the message log.
        payload=None if type_ == "result.chunk" or payload is None else bytes(payload),
        problem=None if reply is None else reply["detail"],
    )
    if reply is not None and type_ == "error":
        # Never answer an error with an error: two peers could bounce them forever.
        reg.violation(ctx.node_id, f"error: not answered: {reply['detail']}")
        return
    if reply is not None:
        reg.violation(ctx.node_id, f"{type_}: answered {reply['code']}: {reply['detail']}")
        await ctx.send(reply)
        return
    for text in validate.violations(type_, message, validate.AGENT_MESSAGES[type_]):
        reg.violation(ctx.node_id, text)
    handler = HANDLERS.get(type_)
    if handler is not None:
        await handler(ctx, message, payload)


async def on_heartbeat(ctx: Context, message: dict[str, Any], _payload: memoryview | None) -> None:
    seq = message["seq"]
    if seq != ctx.next_seq:
        ctx.registry.violation(ctx.node_id, f"heartbeat: seq {seq}, expected {ctx.next_seq}")
    # Resynchronise on what was received, so that one gap is one violation.
    ctx.next_seq = seq + 1
    ctx.registry.heartbeat(ctx.node_id, ctx.session_id, seq, float(message["ts"]))


async def on_job_answer(ctx: Context, message: dict[str, Any], _payload: memoryview | None) -> None:
    track = ctx.registry.track(ctx.node_id, message["job_id"])
    for text in jobs.check_answer(track, message, ctx.session_id):
        ctx.registry.violation(ctx.node_id, text)
    ctx.registry.touch()


async def on_job_state(ctx: Context, message: dict[str, Any], _payload: memoryview | None) -> None:
    """Check the state against the job's history; with ``auto_ack``, ack a terminal one.

    Every terminal ``job.state`` is acknowledged, repeats included: the agent repeats
    it after a reconnect precisely because an earlier ``job.ack`` may have been lost.
    """
    job_id = message["job_id"]
    track = ctx.registry.track(ctx.node_id, job_id)
    accepted = ctx.results.accepted(ctx.node_id, job_id)
    for text in jobs.check_state(track, message, ctx.session_id, accepted):
        ctx.registry.violation(ctx.node_id, text)
    ctx.registry.touch()
    if ctx.auto_ack and message["state"] in jobs.TERMINAL:
        await ctx.send({"type": "job.ack", "job_id": job_id})


async def on_result_manifest(ctx: Context, message: dict[str, Any], _p: memoryview | None) -> None:
    await ctx.results.on_manifest(ctx, message)


async def on_result_chunk(
    ctx: Context, message: dict[str, Any], payload: memoryview | None
) -> None:
    await ctx.results.on_chunk(ctx, message, b"" if payload is None else payload)


async def on_result_end(ctx: Context, message: dict[str, Any], _payload: memoryview | None) -> None:
    await ctx.results.on_end(ctx, message)


async def on_artifact_get(
    ctx: Context, message: dict[str, Any], _payload: memoryview | None
) -> None:
    """Stream the artifact (§6), or answer ``unknown_artifact`` / ``bad_message``.

    An ``offset`` equal to the size is a complete download: just ``artifact.end``.
    A negative one, or one past the end, is ``bad_message`` (docs/protocol.md is silent).
    """
    artifact_id, offset = message["artifact"], message["offset"]
    ctx.registry.artifact_request(ctx.node_id, ArtifactRequest(artifact_id, offset, ctx.session_id))
    artifact = ctx.artifacts.get(artifact_id)
    if artifact is None:
        await ctx.send(error("unknown_artifact", artifact_id, "artifact.get"))
        return
    if not 0 <= offset <= artifact.size:
        detail = f"offset {offset} is outside the artifact's 0..{artifact.size}"
        ctx.registry.violation(ctx.node_id, f"artifact.get: {detail}")
        await ctx.send(error("bad_message", detail, "artifact.get"))
        return
    await artifacts.stream(ctx, ctx.artifacts, artifact_id, offset)


HANDLERS: dict[str, Handler] = {
    "heartbeat": on_heartbeat,
    "job.accepted": on_job_answer,
    "job.rejected": on_job_answer,
    "job.state": on_job_state,
    "result.manifest": on_result_manifest,
    "result.chunk": on_result_chunk,
    "result.end": on_result_end,
    "artifact.get": on_artifact_get,
}
