"""Binary frames (docs/protocol.md §2): a 4-byte big-endian header length, a JSON header, a payload.

::

    bytes 0..3        H, the header length, unsigned 32-bit big-endian
    bytes 4..4+H      header: a UTF-8 JSON object with a string field "type"
    bytes 4+H..end    payload
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

from agent.protocol import MAX_HEADER

_LENGTH = struct.Struct(">I")
LENGTH_PREFIX = _LENGTH.size  # bytes before the header
# One encoder and one decoder, not json.dumps/json.loads with options: each of those
# builds a new one per call, which per small-file frame cost more than the JSON itself.
_HEADER_ENCODER = json.JSONEncoder(separators=(",", ":"))


class FrameError(ValueError):
    """A binary frame that does not follow §2; the message says what is wrong."""


@dataclass(frozen=True)
class BinaryFrame:
    header: dict[str, Any]
    payload: bytes | memoryview

    @property
    def type(self) -> str:
        return str(self.header["type"])


def _encode_header(header: dict[str, Any]) -> bytes:
    if not isinstance(header.get("type"), str):
        raise FrameError("header needs a string field 'type'")
    raw = _HEADER_ENCODER.encode(header).encode()
    if len(raw) > MAX_HEADER:
        raise FrameError(f"header is {len(raw)} bytes, more than {MAX_HEADER}")
    return raw


def encode_binary(header: dict[str, Any], payload: bytes | memoryview = b"") -> bytes:
    """Build one binary frame. ``header`` must hold a string ``type``.

    Raises :class:`FrameError` when the header is over the 4 KiB the protocol allows.
    """
    raw = _encode_header(header)
    return b"".join((_LENGTH.pack(len(raw)), raw, payload))


# Room before the payload for the longest length prefix and header §2 allows.
HEADROOM = _LENGTH.size + MAX_HEADER


class FrameBuffer:
    """One reusable buffer that a binary frame is built in, payload first, without a copy.

    Read up to ``max_payload`` bytes into :meth:`payload`, then :meth:`frame` writes the
    length prefix and header right before them and returns the whole frame as a view of
    the buffer. Reusing one buffer matters for bulk sends: a fresh 1 MiB object per
    frame (the join of :func:`encode_binary`) costs page faults, since glibc hands large
    freed blocks back to the kernel. The view is only valid until the buffer is used
    again: whoever sends it must be done with it (websockets masks it into a copy of its
    own as it sends) before the next :meth:`payload`.
    """

    def __init__(self, max_payload: int) -> None:
        self._buffer = bytearray(HEADROOM + max_payload)
        self._view = memoryview(self._buffer)

    def payload(self, size: int) -> memoryview:
        """Where the next frame's ``size`` payload bytes go."""
        if not 0 <= size <= len(self._buffer) - HEADROOM:
            raise FrameError(f"payload of {size} bytes does not fit the frame buffer")
        return self._view[HEADROOM : HEADROOM + size]

    def frame(self, header: dict[str, Any], size: int) -> memoryview:
        """The frame: ``header`` (same rules as :func:`encode_binary`) and the ``size``
        bytes last written to :meth:`payload`."""
        raw = _encode_header(header)
        start = HEADROOM - _LENGTH.size - len(raw)
        _LENGTH.pack_into(self._buffer, start, len(raw))
        self._view[start + _LENGTH.size : HEADROOM] = raw
        return self._view[start : HEADROOM + size]


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)


def loads(text: str | bytes) -> Any:
    """Strict JSON: :func:`json.loads`, except that ``NaN``, ``Infinity`` and ``-Infinity``
    (which Python accepts and RFC 8259 §6 does not) raise ``ValueError``."""
    if isinstance(text, bytes | bytearray):
        text = text.decode(json.detect_encoding(text), "surrogatepass")
    elif text.startswith("\ufeff"):
        raise ValueError("JSON text starts with a byte order mark")  # as json.loads says
    return _DECODER.decode(text)


def decode_binary(data: bytes) -> BinaryFrame:
    """Split a binary frame. The payload is a zero-copy view into ``data``.

    Raises :class:`FrameError` for a short frame, a header length past the end, a
    header that is not a UTF-8 JSON object, or one without a string ``type``.
    """
    if len(data) < _LENGTH.size:
        raise FrameError(f"binary frame of {len(data)} bytes is shorter than its length prefix")
    (length,) = _LENGTH.unpack_from(data)
    end = _LENGTH.size + length
    if end > len(data):
        raise FrameError(f"header length {length} runs past the end of a {len(data)}-byte frame")
    try:
        header = loads(bytes(data[_LENGTH.size : end]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise FrameError("binary frame header is not UTF-8 JSON") from exc
    except RecursionError as exc:
        raise FrameError("binary frame header is nested too deeply") from exc
    if not isinstance(header, dict):
        raise FrameError("binary frame header is not a JSON object")
    if not isinstance(header.get("type"), str):
        raise FrameError("binary frame header lacks a string 'type'")
    return BinaryFrame(header, memoryview(data)[end:])
