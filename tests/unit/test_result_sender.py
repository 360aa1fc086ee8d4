"""The §5 sender state without I/O (agent.protocol.results): window, cumulative acks,
resume, rejections, the high-water marks that decide what is recorded as a resend."""

from __future__ import annotations

from typing import Any

import pytest

from agent.protocol import MAX_CHUNK_PAYLOAD, messages
from agent.protocol.results import (
    AwaitMessage,
    Done,
    FileEntry,
    RecordResends,
    ResultSender,
    SendChunk,
    SendMessage,
    TooManyRejections,
)

MIB = 1024 * 1024
JOB = "j-1"


def sender(
    sizes: list[int], *, high: list[int] | None = None, window: int = 16 * MIB
) -> ResultSender:
    files = [FileEntry(f"f{i}", size) for i, size in enumerate(sizes)]
    manifest = {"type": "result.manifest", "job_id": JOB}
    return ResultSender(JOB, manifest, files, high or [0] * len(sizes), window=window)


def resume(offsets: list[int]) -> messages.ResultResume:
    return messages.ResultResume(type="result.resume", job_id=JOB, offsets=offsets)


def ack(file: int, offset: int) -> messages.ResultAck:
    return messages.ResultAck(type="result.ack", job_id=JOB, file=file, offset=offset)


ACCEPTED = messages.ResultAccepted(type="result.accepted", job_id=JOB)


def rejected(file: int) -> messages.ResultRejected:
    return messages.ResultRejected(
        type="result.rejected", job_id=JOB, file=file, code="checksum_mismatch"
    )


def drain(s: ResultSender) -> list[Any]:
    """Run the sender until it waits for a message; every chunk 'sent'."""
    actions: list[Any] = []
    while True:
        action = s.next_action()
        if isinstance(action, AwaitMessage | Done):
            actions.append(action)
            return actions
        if isinstance(action, SendChunk):
            s.chunk_sent(action)
        actions.append(action)


def chunks(actions: list[Any]) -> list[tuple[int, int, int]]:
    return [(a.file, a.offset, a.size) for a in actions if isinstance(a, SendChunk)]


def types(actions: list[Any]) -> list[str]:
    return [a.message["type"] for a in actions if isinstance(a, SendMessage)]


def started(s: ResultSender, offsets: list[int]) -> list[Any]:
    s.begin()
    assert types(drain(s)) == ["result.manifest"]
    s.receive(resume(offsets))
    return drain(s)


def test_a_small_upload_sends_manifest_chunks_end_and_finishes_on_accepted() -> None:
    s = sender([3, 0, MAX_CHUNK_PAYLOAD + 5])
    actions = started(s, [0, 0, 0])
    assert chunks(actions) == [(0, 0, 3), (2, 0, MAX_CHUNK_PAYLOAD), (2, MAX_CHUNK_PAYLOAD, 5)]
    assert types(actions) == ["result.end"]
    s.receive(ACCEPTED)
    assert s.next_action() == Done()


def test_the_window_stops_sending_until_acks_free_it() -> None:
    """Flow control: never more than the window sent but not acknowledged."""
    s = sender([4 * MIB], window=2 * MIB)
    assert chunks(started(s, [0])) == [(0, 0, MIB), (0, MIB, MIB)]
    s.receive(ack(0, MIB))
    assert chunks(drain(s)) == [(0, 2 * MIB, MIB)]


def test_one_cumulative_ack_of_a_later_file_credits_every_file_before_it() -> None:
    """Revision 1.1: ack (k, o) says files 0..k-1 are whole. A control plane that acks
    only now and then must not stall a stream of many small files."""
    s = sender([1024] * 40, window=10 * 1024)
    assert len(chunks(started(s, [0] * 40))) == 10
    s.receive(ack(10, 0))  # files 0-9 whole, one ack for ten files
    assert [c[0] for c in chunks(drain(s))] == list(range(10, 20))
    s.receive(ack(40, 0))  # past the last file: everything whole
    actions = drain(s)
    assert [c[0] for c in chunks(actions)] == list(range(20, 30))


def test_a_per_file_ack_as_in_revision_1_0_still_frees_the_window() -> None:
    s = sender([1024] * 4, window=2048)
    assert len(chunks(started(s, [0] * 4))) == 2
    s.receive(ack(0, 1024))
    s.receive(ack(1, 1024))
    assert [c[0] for c in chunks(drain(s))] == [2, 3]


def test_an_ack_beyond_what_was_sent_does_not_open_the_window_further() -> None:
    """A lying control plane cannot make the agent exceed its window."""
    s = sender([4 * MIB], window=MIB)
    assert len(chunks(started(s, [0]))) == 1
    s.receive(ack(0, 4 * MIB))  # only 1 MiB was sent
    assert chunks(drain(s)) == [(0, MIB, MIB)]
    s.receive(ack(5, 7))  # nonsense: ignored
    assert chunks(drain(s)) == []


def test_resume_skips_what_the_control_plane_holds() -> None:
    s = sender([10, 20])
    assert chunks(started(s, [10, 5])) == [(1, 5, 15)]


def test_a_resume_that_cannot_fit_the_manifest_starts_every_file_again() -> None:
    s = sender([10, 20])
    actions = started(s, [11, 0])
    assert chunks(actions) == [(0, 0, 10), (1, 0, 20)]
    assert ("result_resume_invalid", {"offsets": [11, 0]}) in s.events


def test_accepted_in_place_of_resume_means_already_delivered() -> None:
    s = sender([10])
    s.begin()
    drain(s)
    s.receive(ACCEPTED)
    assert s.next_action() == Done(already=True)


def test_a_rejected_file_goes_again_from_zero_and_is_recorded_as_a_resend() -> None:
    s = sender([10, 20])
    started(s, [0, 0])
    s.receive(rejected(1))
    actions = drain(s)
    assert actions[0] == RecordResends((("f1", 0, 20, "rejected"),))
    assert chunks(actions) == [(1, 0, 20)]
    assert types(actions) == ["result.end"]


def test_the_third_rejection_fails_the_delivery() -> None:
    s = sender([10])
    started(s, [0])
    for _ in range(2):
        s.receive(rejected(0))
        drain(s)
    s.receive(rejected(0))
    with pytest.raises(TooManyRejections):
        s.next_action()


def test_bytes_that_may_have_left_in_a_lost_session_are_recorded_before_going_again() -> None:
    """Exactly-once accounting: a resume below what the last session handed to the
    socket is a resend, and the ledger hears it before the bytes go."""
    s = sender([3 * MIB])
    assert len(chunks(started(s, [0]))) == 3
    s.session_lost()
    actions = started(s, [MIB])
    assert actions[0] == RecordResends((("f0", MIB, 3 * MIB, "session_lost"),))
    assert chunks(actions)[0] == (0, MIB, MIB)


def test_files_an_earlier_run_recorded_count_as_sent_whole() -> None:
    s = sender([10, 20], high=[10, 20])
    actions = started(s, [0, 20])
    assert actions[0] == RecordResends((("f0", 0, 10, "agent_restarted"),))


def test_messages_of_an_old_phase_are_ignored_not_obeyed() -> None:
    """A result.accepted while chunks are still going is not a verdict."""
    s = sender([4 * MIB], window=MIB)
    started(s, [0])
    s.receive(ACCEPTED)
    s.receive(rejected(0))
    assert isinstance(s.next_action(), AwaitMessage)
    assert s.rejections == 0


def test_an_empty_manifest_sends_end_at_once() -> None:
    s = sender([])
    assert types(started(s, [])) == ["result.end"]
