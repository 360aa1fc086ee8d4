"""Result streaming's cheap paths (issue 11): the packed spool, frames built in one reused
buffer, one audit log line per append. Each test is what a user would notice if the
shortcut were wrong: another file's bytes under a file's name, a frame the control plane
cannot split, an upgrade that fails a job, or a log flooded line by line."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from agent.audit import AuditLedger, ledger_path, verify
from agent.link import Uplink
from agent.protocol import MAX_CHUNK_PAYLOAD, MAX_HEADER, messages
from agent.protocol.frames import FrameBuffer, FrameError, decode_binary, encode_binary
from agent.protocol.session import Session, SessionError
from agent.results.scan import ResultFile
from agent.results.spool import Manifest, Spool
from agent.results.uploader import Uploader
from tests.helpers.env import seconds

MIB = 1024 * 1024


class _Receiver:
    """A control plane that keeps every chunk's bytes by file, acknowledges each chunk
    (§5: the agent keeps at most 16 MiB unacknowledged) and accepts at the end."""

    def __init__(self, uploader: Uploader, files: int) -> None:
        self.uploader = uploader
        self.got = [bytearray() for _ in range(files)]

    async def send(self, message: dict[str, Any]) -> None:
        job, kind = message["job_id"], message["type"]
        reply: Any
        if kind == "result.manifest":
            offsets = [0] * len(self.got)
            reply = messages.ResultResume(type="result.resume", job_id=job, offsets=offsets)
        else:
            reply = messages.ResultAccepted(type="result.accepted", job_id=job)
        asyncio.get_running_loop().call_soon(self.uploader.route, reply)

    async def send_frame(self, type_: str, frame: bytes | memoryview) -> None:
        sent = decode_binary(bytes(frame))  # a copy: the uploader reuses its buffer
        assert sent.type == type_ == "result.chunk"
        index = sent.header["file"]
        got = self.got[index]
        assert sent.header["offset"] == len(got)
        got += sent.payload
        job = sent.header["job_id"]
        ack = messages.ResultAck(type="result.ack", job_id=job, file=index, offset=len(got))
        asyncio.get_running_loop().call_soon(self.uploader.route, ack)


def _deliver(spool: Spool, manifest: Manifest) -> list[bytes]:
    async def main() -> list[bytes]:
        uplink = Uplink()
        uploader = Uploader(uplink, spool)
        receiver = _Receiver(uploader, len(manifest.files))
        uplink.attach(receiver)
        await asyncio.wait_for(uploader.deliver(manifest), seconds(10))
        return [bytes(b) for b in receiver.got]

    return asyncio.run(main())


def test_each_file_leaves_with_its_own_bytes_from_the_packed_spool(tmp_path: Path) -> None:
    """Attack (integrity): the spool packs every file into one data file; a chunk read at
    the wrong place in it would send a neighbour's bytes under this file's name (or a
    file cut short). Sizes straddle the 1 MiB chunk and include empty files."""
    out = tmp_path / "out"
    (out / "sub" / "deeper").mkdir(parents=True)
    sizes = {
        "a.bin": MAX_CHUNK_PAYLOAD + 17,
        "b.empty": 0,
        "sub/c.csv": 1024,
        "sub/deeper/d.bin": 2 * MAX_CHUNK_PAYLOAD,
        "sub/e.empty": 0,
        "z.txt": 3,
    }
    originals = {path: os.urandom(size) for path, size in sizes.items()}
    for path, data in originals.items():
        (out / path).write_bytes(data)
    spool = Spool(tmp_path / "spool")
    manifest = spool.store("job-1", out, 64 * MIB, 100)
    assert [f.path for f in manifest.files] == sorted(sizes)
    assert spool.data_path("job-1").stat().st_size == manifest.total_bytes
    got = _deliver(spool, manifest)
    for f, data in zip(manifest.files, got, strict=True):
        assert data == originals[f.path], f.path
        assert f.sha256 == hashlib.sha256(data).hexdigest()


def test_a_large_output_spooled_with_writeback_started_midway_leaves_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Speed without loss: the copy starts the disk's writeback of what it wrote every
    8 MiB while it reads and hashes on. The ranges must cover the spool file in order,
    once each, and every file must still leave with its own bytes."""
    from agent.results import scan

    started: list[tuple[int, int]] = []
    real = scan.start_writeback

    def spy(fd: int, offset: int, length: int) -> None:
        started.append((offset, length))
        real(fd, offset, length)

    monkeypatch.setattr(scan, "start_writeback", spy)
    out = tmp_path / "out"
    out.mkdir()
    sizes = {"a.bin": 9 * MIB + 5, "b.bin": 1, "c.bin": 12 * MIB - 7}
    originals = {path: os.urandom(size) for path, size in sizes.items()}
    for path, data in originals.items():
        (out / path).write_bytes(data)
    spool = Spool(tmp_path / "spool")
    manifest = spool.store("job-1", out, 64 * MIB, 100)
    assert len(started) == 2, started  # 21 MiB: after 8 and after 16
    assert [offset for offset, _ in started] == [0, sum(started[0])]
    assert sum(length for _, length in started) <= manifest.total_bytes
    got = _deliver(spool, manifest)
    for f, data in zip(manifest.files, got, strict=True):
        assert data == originals[f.path], f.path


def test_an_entry_an_earlier_agent_spooled_file_by_file_is_still_sent(tmp_path: Path) -> None:
    """Attack (upgrade): an agent restarted onto this version mid-upload finds a spool
    entry with one file per result and no packed data file; reading it as packed would
    fail the job (its output is already gone) or send the wrong bytes."""
    spool = Spool(tmp_path / "spool")
    contents = [os.urandom(MAX_CHUNK_PAYLOAD + 5), b"", os.urandom(10)]
    files = []
    for index, data in enumerate(contents):
        path = spool.legacy_file_path("job-1", index)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        files.append(ResultFile(index, f"f{index}", len(data), hashlib.sha256(data).hexdigest()))
    assert not spool.data_path("job-1").exists()
    assert _deliver(spool, Manifest("job-1", tuple(files))) == contents


@pytest.mark.parametrize("job_id", ["j", "j" * 200])
@pytest.mark.parametrize("size", [0, 1, MAX_CHUNK_PAYLOAD])
def test_a_frame_built_in_place_is_the_frame_the_protocol_defines(job_id: str, size: int) -> None:
    """Attack (framing): the header is written in front of a payload already in the
    buffer; a length prefix off by one, or a header overlapping the payload, would make
    the control plane refuse the frame or split it at the wrong byte."""
    buffer = FrameBuffer(MAX_CHUNK_PAYLOAD)
    for _ in range(2):  # the second frame reuses what the first left behind
        payload = os.urandom(size)
        buffer.payload(size)[:] = payload
        header = messages.result_chunk_header(job_id, 3, 7 * size)
        frame = bytes(buffer.frame(header, size))
        assert frame == encode_binary(header, payload)
        assert decode_binary(frame).header == header


def test_a_frame_buffer_refuses_what_the_protocol_refuses() -> None:
    """Attack (framing): a header over 4 KiB would be written over the start of the
    buffer's room and sent; a payload over the buffer would be cut."""
    buffer = FrameBuffer(16)
    with pytest.raises(FrameError, match="more than"):
        buffer.frame({"type": "result.chunk", "pad": "x" * MAX_HEADER}, 0)
    with pytest.raises(FrameError, match="does not fit"):
        buffer.payload(17)


def test_recording_many_result_files_logs_one_line_with_the_head(tmp_path: Path) -> None:
    """Attack (cost and shipping): recording 10,000 result files used to log 10,000
    lines, 11 µs each on the path to the first byte; the one line must still carry the
    head that `audit --verify` reports, so the off-box check keeps working."""
    path = ledger_path(tmp_path)
    n = 500
    files = [(f"out/f{i}", i, hashlib.sha256(str(i).encode()).hexdigest()) for i in range(n)]
    with capture_logs() as logs, AuditLedger(path) as ledger:
        ledger.job_assigned("job-1", "registry.example.com/p/m:1", None, None, None)
        ledger.result_files_sent("job-1", files)
    lines = [e for e in logs if e["event"] == "audit_entry"]
    assert [(e["seq"], e["entries"]) for e in lines] == [(1, 1), (1 + n, n)]
    assert lines[-1]["hash"] == verify(path).head
    assert json.loads(path.read_bytes().splitlines()[-1])["path"] == f"out/f{n - 1}"


def test_a_built_frame_waits_for_welcome_and_goes_out_as_built() -> None:
    """Attack (protocol order, §3): a result chunk handed to the session before the
    control plane's ``welcome`` would leave before the session exists; after it, the
    frame must go out byte for byte as built, and be counted by its type."""
    hello = {"type": "hello", "protocol": 1, "node_id": "n1"}
    session = Session(hello)
    session.initiate()
    frame = encode_binary(messages.result_chunk_header("j", 0, 0), b"abc")
    with pytest.raises(SessionError):
        session.send_frame("result.chunk", frame)
    session.data_to_send()
    session.receive_text(json.dumps({"type": "welcome", "session": "s-1", "heartbeat_s": 15}))
    session.send_frame("result.chunk", memoryview(frame))
    assert [bytes(f) for f in session.data_to_send()] == [frame]
    assert session.stats.sent["result.chunk"] == 1
