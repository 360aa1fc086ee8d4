"""The binary frame codec of PROTOCOL.md §2."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.protocol.frames import FrameError, decode_binary, encode_binary


def test_layout_is_length_header_payload() -> None:
    frame = encode_binary({"type": "result.chunk", "job_id": "j-1", "file": 0, "offset": 0}, b"xyz")
    header_len = int.from_bytes(frame[:4], "big")
    assert (
        frame[4 : 4 + header_len] == b'{"type":"result.chunk","job_id":"j-1","file":0,"offset":0}'
    )
    assert frame[4 + header_len :] == b"xyz"


@given(
    header=st.dictionaries(st.text(max_size=10), st.integers() | st.text(max_size=20), max_size=5),
    payload=st.binary(max_size=2048),
)
def test_round_trip(header: dict[str, object], payload: bytes) -> None:
    header = {**header, "type": "artifact.chunk"}
    decoded = decode_binary(encode_binary(header, payload))
    assert decoded.header == header
    assert bytes(decoded.payload) == payload


def test_oversized_header_is_refused() -> None:
    with pytest.raises(FrameError, match="more than 4096"):
        encode_binary({"type": "x", "pad": "a" * 5000})


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00\x00\x01",
        b"\x00\x00\x00\x10{}",
        b"\x00\x00\x00\x02{}",
        b"\x00\x00\x00\x01\xff",
        (300_000).to_bytes(4, "big") + b"[" * 300_000,
    ],
)
def test_malformed_frames_raise_frame_error(data: bytes) -> None:
    with pytest.raises(FrameError):
        decode_binary(data)


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity"])
def test_a_header_with_nan_or_infinity_is_not_json(constant: bytes) -> None:
    header = b'{"type":"artifact.chunk","offset":' + constant + b"}"
    with pytest.raises(FrameError, match="not UTF-8 JSON"):
        decode_binary(len(header).to_bytes(4, "big") + header)
