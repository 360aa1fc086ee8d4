"""Turning the agent's frames into recorded messages, error replies and handler calls.

One entry point, :func:`dispatch`, for every frame after ``hello``; a handler per
message type in :data:`HANDLERS`. A type without a handler is only checked and
recorded; jobs (§4), results (§5) and artifacts (§6) grow here by adding handlers.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, Protocol

from agent.controlplane import validate
from agent.controlplane.errors import ControlPlaneError
from agent.controlplane.state import Registry
from agent.protocol import MAX_CHUNK_PAYLOAD, MAX_HEADER
from agent.protocol.frames import FrameError, decode_binary


class Context(Protocol):
    """What a handler may use: the session it runs in and the node's record."""

    node_id: str
    session_id: str
    registry: Registry
    next_seq: int

    async def send(self, message: dict[str, Any]) -> None:
        """Send one text message to the agent, recording it on the node."""


Handler = Callable[[Context, dict[str, Any], bytes | None], Awaitable[None]]


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


def _no_constants(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def parse_text(text: str) -> dict[str, Any]:
    """The JSON object in a text frame. Raises :class:`BadFrame` (``bad_message``)."""
    try:
        # NaN and Infinity are Python's extensions, not JSON; a ts of NaN is no time.
        message = json.loads(text, parse_constant=_no_constants)
    except (ValueError, RecursionError) as exc:
        raise BadFrame(error("bad_message", "text frame is not JSON")) from exc
    if not isinstance(message, dict):
        raise BadFrame(error("bad_message", "text frame is not a JSON object"))
    if not isinstance(message.get("type"), str):
        raise BadFrame(error("bad_message", "message lacks a string field 'type'"))
    return message


def parse_binary(data: bytes) -> tuple[dict[str, Any], bytes]:
    """Header and payload of a binary frame. Raises :class:`BadFrame` (``bad_message``)."""
    try:
        frame = decode_binary(data)
    except (FrameError, RecursionError) as exc:
        # FrameError texts describe the frame only, never its content.
        raise BadFrame(error("bad_message", f"bad binary frame: {exc}")) from exc
    return frame.header, bytes(frame.payload)


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
    payload: bytes | None = None
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
    reply = _check(type_, message, binary=payload is not None)
    reg.received(
        ctx.node_id,
        ctx.session_id,
        type_,
        message,
        payload=payload,
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


async def on_heartbeat(ctx: Context, message: dict[str, Any], _payload: bytes | None) -> None:
    seq = message["seq"]
    if seq != ctx.next_seq:
        ctx.registry.violation(ctx.node_id, f"heartbeat: seq {seq}, expected {ctx.next_seq}")
    # Resynchronise on what was received, so that one gap is one violation.
    ctx.next_seq = seq + 1
    ctx.registry.heartbeat(ctx.node_id, ctx.session_id, seq, float(message["ts"]))


async def on_result_chunk(ctx: Context, message: dict[str, Any], payload: bytes | None) -> None:
    # §5: at most 1 MiB of payload plus a header of at most 4 KiB. Checked here
    # because the frame has already been accepted (it fits max_size).
    size = len(payload or b"")
    if size > MAX_CHUNK_PAYLOAD:
        ctx.registry.violation(ctx.node_id, f"result.chunk: payload of {size} bytes")
    header = len(json.dumps(message, separators=(",", ":")).encode())
    if header > MAX_HEADER:
        ctx.registry.violation(ctx.node_id, f"result.chunk: header of about {header} bytes")


HANDLERS: dict[str, Handler] = {
    "heartbeat": on_heartbeat,
    "result.chunk": on_result_chunk,
}
