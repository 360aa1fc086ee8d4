"""The pure session: frames in, events and frames out (PROTOCOL.md §2, §3, §8)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.protocol.frames import encode_binary
from agent.protocol.messages import ArtifactChunk, JobAssign, JobCancel
from agent.protocol.session import (
    Answered,
    Fatal,
    Ignored,
    InvalidAssignment,
    PeerError,
    Received,
    Session,
    SessionError,
    SessionState,
    Welcomed,
)
from tests.helpers.strategies import frames as any_frames

HELLO = {"type": "hello", "protocol": 1, "node_id": "n1"}
WELCOME = json.dumps({"type": "welcome", "session": "s-1", "heartbeat_s": 15})


def sent(session: Session) -> list[dict[str, Any]]:
    return [json.loads(frame) for frame in session.data_to_send() if isinstance(frame, str)]


def established() -> Session:
    session = Session(HELLO)
    session.initiate()
    session.data_to_send()
    assert session.receive_text(WELCOME) == [Welcomed("s-1", 15.0)]
    return session


def test_hello_first_then_nothing_until_welcome() -> None:
    session = Session(HELLO)
    session.initiate()
    assert sent(session) == [HELLO]
    assert session.heartbeat(1.0, {}) is False
    with pytest.raises(SessionError):
        session.send({"type": "job.state", "job_id": "j", "state": "running", "ts": 1.0})
    assert session.data_to_send() == []


def test_welcome_then_heartbeats_count_from_one() -> None:
    session = established()
    for expected_seq, now in enumerate((10.0, 25.0, 40.0), start=1):
        assert session.heartbeat(now, {"jobs": []})
        (beat,) = sent(session)
        assert beat == {"type": "heartbeat", "seq": expected_seq, "ts": now, "jobs": []}
    # A new session starts again at 1.
    again = established()
    again.heartbeat(50.0, {})
    assert sent(again)[0]["seq"] == 1


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("not json at all", "bad_message"),
        ("[1, 2, 3]", "bad_message"),
        ('"a string"', "bad_message"),
        ("42", "bad_message"),
        ("null", "bad_message"),
        ('{"no_type": true}', "bad_message"),
        ('{"type": 7}', "bad_message"),
        ('{"type": null}', "bad_message"),
        ('{"type": "job.cancel", "job_id": 5}', "bad_message"),
        ('{"type": "job.ack"}', "bad_message"),
        ('{"type": "result.ack", "job_id": "j", "file": "0", "offset": 3}', "bad_message"),
        ('{"type": "result.ack", "job_id": "j", "file": true, "offset": 3}', "bad_message"),
        ('{"type": "result.resume", "job_id": "j", "offsets": [-1]}', "bad_message"),
        ('{"type": "welcome", "session": 1, "heartbeat_s": 15}', "bad_message"),
        ('{"type": "job.explode", "job_id": "j"}', "unknown_type"),
    ],
)
def test_robustness_rules_answer_error_and_continue(frame: str, code: str) -> None:
    session = established()
    (event,) = session.receive_text(frame)
    assert isinstance(event, Answered)
    (reply,) = sent(session)
    assert reply["type"] == "error"
    assert reply["code"] == code
    assert isinstance(reply["detail"], str)
    if code == "unknown_type":
        assert reply["detail"] == "job.explode"
    # The session goes on.
    assert session.state is SessionState.ESTABLISHED
    assert session.heartbeat(1.0, {})
    assert sent(session)[0]["type"] == "heartbeat"


def test_wrong_field_type_error_names_the_field_and_the_message_type() -> None:
    session = established()
    session.receive_text('{"type": "job.cancel", "job_id": ["x"]}')
    (reply,) = sent(session)
    assert reply["ref"] == "job.cancel"
    assert reply["detail"].startswith("job_id:")


def test_error_detail_never_echoes_the_value() -> None:
    session = established()
    secret_looking = "A" * 50 + "/etc/shadow"
    session.receive_text(json.dumps({"type": "job.cancel", "job_id": secret_looking}))
    (reply,) = sent(session)
    assert "/etc/shadow" not in json.dumps(reply)


def test_unknown_fields_are_ignored() -> None:
    session = established()
    (event,) = session.receive_text(
        '{"type": "job.cancel", "job_id": "j-1", "priority": "high", "nested": {"x": [1]}}'
    )
    assert isinstance(event, Received)
    assert event.message == JobCancel(type="job.cancel", job_id="j-1")
    assert sent(session) == []


def test_unknown_fields_in_welcome_are_ignored() -> None:
    session = Session(HELLO)
    session.initiate()
    events = session.receive_text(
        '{"type": "welcome", "session": "s", "heartbeat_s": 5, "features": ["x"]}'
    )
    assert events == [Welcomed("s", 5.0)]


def test_job_assign_with_bad_spec_but_usable_id_is_for_bad_spec() -> None:
    session = established()
    (event,) = session.receive_text('{"type": "job.assign", "job_id": "j-7", "image": {}}')
    assert isinstance(event, InvalidAssignment)
    assert event.job_id == "j-7"
    assert "image.ref" in event.detail
    assert sent(session) == []  # the job layer answers job.rejected / bad_spec


def test_job_assign_without_usable_id_is_bad_message() -> None:
    session = established()
    (event,) = session.receive_text('{"type": "job.assign", "job_id": "no spaces allowed"}')
    assert isinstance(event, Answered)
    assert sent(session)[0]["code"] == "bad_message"


def test_full_job_assign_parses() -> None:
    session = established()
    assign = {
        "type": "job.assign",
        "job_id": "j-1",
        "image": {
            "ref": "registry.example/provider/sepsis:1.4",
            "digest": "sha256:" + "a" * 64,
            "auth": {"username": "u", "password": "hunter2-pass"},
        },
        "model": {"artifact": "mdl-9", "sha256": "b" * 64, "size": 1048576},
        "datastore": "vitals",
        "command": ["python", "/opt/model/predict.py"],
        "env": {"BATCH_SIZE": "64"},
        "gpus": {"count": 1, "types": ["NVIDIA H100 80GB HBM3"]},
        "resources": {"cpus": 8, "memory_mib": 32768},
        "timeout_s": 3600,
        "results": {"max_bytes": 104857600, "max_files": 1000},
    }
    (event,) = session.receive_text(json.dumps(assign))
    assert isinstance(event, Received)
    assert isinstance(event.message, JobAssign)
    assert event.message.resources is not None and event.message.resources.cpus == 8
    assert "hunter2-pass" not in repr(event.message)  # credentials stay out of reprs and logs


def test_binary_artifact_chunk_and_bad_binary() -> None:
    session = established()
    frame = encode_binary({"type": "artifact.chunk", "artifact": "mdl-9", "offset": 0}, b"abc")
    (event,) = session.receive_binary(frame)
    assert isinstance(event, Received) and isinstance(event.message, ArtifactChunk)
    assert bytes(event.message.payload) == b"abc"
    for bad, code in (
        (b"\x00\x00", "bad_message"),
        (b"\x00\x00\x00\xffxx", "bad_message"),
        (b"\x00\x00\x00\x02[]", "bad_message"),
        (encode_binary({"type": "result.chunk", "job_id": "j"}), "unknown_type"),
        (encode_binary({"type": "artifact.chunk", "artifact": "m", "offset": -1}), "bad_message"),
    ):
        (event,) = session.receive_binary(bad)
        assert isinstance(event, Answered), bad
        assert sent(session)[0]["code"] == code


def test_unsupported_protocol_is_fatal_even_before_welcome() -> None:
    session = Session(HELLO)
    session.initiate()
    session.data_to_send()
    events = session.receive_text('{"type": "error", "code": "unsupported_protocol"}')
    assert events == [Fatal("unsupported_protocol", None)]
    assert session.state is SessionState.CLOSED


def test_other_peer_errors_are_reported_not_answered() -> None:
    session = established()
    events = session.receive_text('{"type": "error", "code": "internal", "detail": "oops"}')
    assert events == [PeerError("internal", "oops", None)]
    assert sent(session) == []


def test_nothing_is_answered_before_welcome() -> None:
    session = Session(HELLO)
    session.initiate()
    session.data_to_send()
    for frame in ("garbage", '{"type": "x"}', '{"type": "job.cancel", "job_id": "j"}'):
        (event,) = session.receive_text(frame)
        assert isinstance(event, Ignored)
    assert session.data_to_send() == []


def test_heartbeat_interval_is_bounded() -> None:
    session = Session(HELLO)
    session.initiate()
    (event,) = session.receive_text('{"type": "welcome", "session": "s", "heartbeat_s": 0.001}')
    assert event == Welcomed("s", 1.0)


def test_stats_count_by_type() -> None:
    session = established()
    session.heartbeat(1.0, {})
    session.receive_text("nope")
    session.receive_text('{"type": "job.ack", "job_id": "j"}')
    assert session.stats.sent["hello"] == 1
    assert session.stats.sent["heartbeat"] == 1
    assert session.stats.sent["error"] == 1
    assert session.stats.received["welcome"] == 1
    assert session.stats.received["job.ack"] == 1


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=st.lists(any_frames, min_size=1, max_size=5))
def test_arbitrary_frames_never_raise_and_the_session_goes_on(frames: list[str | bytes]) -> None:
    session = established()
    for frame in frames:
        if isinstance(frame, bytes):
            session.receive_binary(frame)
        else:
            session.receive_text(frame)
        for out in session.data_to_send():
            assert isinstance(out, str)
            reply = json.loads(out)
            assert reply["type"] == "error"
            assert reply["code"] in ("bad_message", "unknown_type")
    if session.state is SessionState.ESTABLISHED:
        assert session.heartbeat(1.0, {})
    else:  # only an unsupported_protocol error ends it
        assert session.state is SessionState.CLOSED


def awaiting_welcome() -> Session:
    session = Session(HELLO)
    session.initiate()
    session.data_to_send()
    return session


@pytest.mark.parametrize(
    ("welcome", "field"),
    [
        ({"session": "s", "heartbeat_s": "15"}, "heartbeat_s"),
        ({"session": "s", "heartbeat_s": 0}, "heartbeat_s"),
        ({"session": "s", "heartbeat_s": -3}, "heartbeat_s"),
        ({"session": "s", "heartbeat_s": True}, "heartbeat_s"),
        ({"session": "s"}, "heartbeat_s"),
        ({"session": 5, "heartbeat_s": 15}, "session"),
        ({"session": "", "heartbeat_s": 15}, "session"),
        ({"session": "x" * 129, "heartbeat_s": 15}, "session"),
        ({"session": "a\nb", "heartbeat_s": 15}, "session"),
    ],
)
def test_an_invalid_welcome_is_fatal_at_once_naming_the_field(
    welcome: dict[str, Any], field: str
) -> None:
    session = awaiting_welcome()
    events = session.receive_text(json.dumps({"type": "welcome", **welcome}))
    assert events == [Fatal("invalid_welcome", field)]
    assert session.state is SessionState.CLOSED
    assert session.data_to_send() == []  # nothing but hello before welcome


def test_a_session_id_of_128_printable_characters_is_fine() -> None:
    session = awaiting_welcome()
    sid = "~ -" + "a" * 125
    assert session.receive_text(json.dumps({"type": "welcome", "session": sid, "heartbeat_s": 2}))
    assert session.session_id == sid


def test_an_invalid_welcome_after_the_first_is_answered_not_fatal() -> None:
    session = established()
    (event,) = session.receive_text('{"type": "welcome", "session": 1, "heartbeat_s": 15}')
    assert isinstance(event, Answered)
    assert session.state is SessionState.ESTABLISHED


@pytest.mark.parametrize(
    "frame",
    [
        '{"type": "error"}',
        '{"type": "error", "code": 5}',
        '{"type": "error", "code": "internal", "detail": ["x"]}',
        '{"type": "error", "code": "internal", "ref": 7}',
    ],
)
@pytest.mark.parametrize("welcomed", [False, True])
def test_an_invalid_error_is_never_answered(frame: str, welcomed: bool) -> None:
    session = established() if welcomed else awaiting_welcome()
    (event,) = session.receive_text(frame)
    assert isinstance(event, Ignored)
    assert event.why.startswith("invalid error message")
    assert session.data_to_send() == []


def test_peer_error_strings_are_clipped() -> None:
    session = established()
    huge = "E" * 1_000_000
    (event,) = session.receive_text(
        json.dumps({"type": "error", "code": huge, "detail": huge, "ref": huge})
    )
    assert isinstance(event, PeerError)
    assert len(event.code) == len(event.detail or "") == len(event.ref or "") == 300


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_not_json(constant: str) -> None:
    session = established()
    (event,) = session.receive_text(
        '{"type": "result.ack", "job_id": "j", "file": 0, "offset": 0, "x": ' + constant + "}"
    )
    assert isinstance(event, Answered) and event.code == "bad_message"
    header = ('{"type":"artifact.chunk","artifact":"m","offset":0,"x":' + constant + "}").encode()
    (event,) = session.receive_binary(len(header).to_bytes(4, "big") + header)
    assert isinstance(event, Answered) and event.code == "bad_message"


def test_a_known_type_in_the_wrong_kind_of_frame_is_bad_message() -> None:
    session = established()
    (event,) = session.receive_binary(encode_binary({"type": "job.cancel", "job_id": "j"}))
    assert event == Answered("bad_message", "binary frame of a text type")
    assert sent(session)[0]["ref"] == "job.cancel"
    (event,) = session.receive_text('{"type": "artifact.chunk", "artifact": "m", "offset": 0}')
    assert event == Answered("bad_message", "text frame of a binary type")


def test_a_heartbeat_that_cannot_be_encoded_raises_and_takes_no_seq() -> None:
    session = established()
    with pytest.raises(ValueError):
        session.heartbeat(1.0, {"cpu_pct": float("nan")})
    assert session.data_to_send() == []
    assert session.stats.sent["heartbeat"] == 0
    session.heartbeat(2.0, {"cpu_pct": 1.0})
    assert sent(session)[0]["seq"] == 1
