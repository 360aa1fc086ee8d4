"""The audit ledger: what it records, and that every kind of tampering is found."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import itertools
import json
import math
import os
import stat
import threading
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from agent.audit import GENESIS, AuditError, AuditLedger, ledger_path, read, verify
from agent.auditcmd import render_entry
from agent.link import Uplink
from agent.protocol import messages
from agent.protocol.frames import decode_binary
from agent.results.scan import ResultFile
from agent.results.spool import Manifest, Spool
from agent.results.uploader import Uploader

IMAGE = "registry.example.com/provider/model:1.2"
DIGEST = "sha256:" + "1" * 64
MODEL = "2" * 64
ISOLATION: dict[str, Any] = {
    "user": "65534:65534",
    "networks": [],
    "mounts": [
        {"target": "/opt/data", "type": "bind", "rw": False, "propagation": "rprivate"},
        {"target": "/opt/output", "type": "bind", "rw": True, "propagation": "rprivate"},
    ],
    "host_config": {"NetworkMode": "none", "ReadonlyRootfs": True, "CapDrop": ["ALL"]},
}


def one_job(ledger: AuditLedger, job_id: str = "job-1", files: int = 3) -> None:
    """Every entry a job leaves: 2 + files + 2 lines."""
    ledger.job_assigned(job_id, IMAGE, DIGEST, MODEL, "vitals")
    ledger.container_started(job_id, "c0ffee" * 8, ISOLATION)
    for i in range(files):
        ledger.result_file_sent(job_id, f"out/part-{i}.csv", 1000 + i, f"{i:x}" * 64)
    ledger.result_accepted(job_id, files, sum(1000 + i for i in range(files)))
    ledger.job_ended(job_id, "succeeded", None, 0)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return ledger_path(tmp_path)


@pytest.fixture
def full(path: Path) -> list[bytes]:
    """A closed ledger of two jobs (14 lines); its lines."""
    with AuditLedger(path) as ledger:
        one_job(ledger, "job-1")
        one_job(ledger, "job-2")
    return path.read_bytes().splitlines(keepends=True)


def test_a_job_leaves_every_entry_and_the_chain_verifies(path: Path) -> None:
    with AuditLedger(path) as ledger:
        one_job(ledger)
    entries = list(read(path))
    assert [e["kind"] for e in entries] == [
        "job_assigned",
        "container_started",
        *["result_file_sent"] * 3,
        "result_accepted",
        "job_ended",
    ]
    assigned, started, sent = entries[0], entries[1], entries[2]
    assert assigned["image_ref"] == IMAGE and assigned["image_digest"] == DIGEST
    assert assigned["model_sha256"] == MODEL and assigned["datastore"] == "vitals"
    assert started["isolation"] == ISOLATION
    assert (sent["path"], sent["size"], sent["sha256"]) == ("out/part-0.csv", 1000, "0" * 64)
    assert entries[-1]["state"] == "succeeded" and entries[-1]["exit_code"] == 0
    result = verify(path)
    assert result.ok and result.entries == 7 and result.first_bad_line is None


def test_each_prev_is_the_sha256_of_the_previous_line(full: list[bytes]) -> None:
    assert json.loads(full[0])["prev"] == GENESIS == hashlib.sha256(b"").hexdigest()
    for before, line in itertools.pairwise(full):
        assert json.loads(line)["prev"] == hashlib.sha256(before).hexdigest()
    assert [json.loads(line)["seq"] for line in full] == list(range(1, 15))


def test_the_file_is_private(path: Path) -> None:
    path.write_bytes(b"")
    path.chmod(0o644)
    with AuditLedger(path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_reopening_continues_the_chain(path: Path, full: list[bytes]) -> None:
    with AuditLedger(path) as ledger:
        assert ledger.head == (14, hashlib.sha256(full[-1]).hexdigest())
        entry = ledger.job_ended("job-3", "failed", "container_lost", None)
    assert entry["seq"] == 15
    assert verify(path).ok and verify(path).entries == 15


def test_read_filters_by_job(full: list[bytes], path: Path) -> None:
    assert {e["job_id"] for e in read(path, "job-2")} == {"job-2"}
    assert len(list(read(path, "job-2"))) == 7
    assert list(read(path, "job-9")) == []


def test_each_append_logs_its_seq_and_hash_for_shipping_off_box(path: Path) -> None:
    with capture_logs() as logs, AuditLedger(path) as ledger:
        one_job(ledger, files=1)
    heads = [(e["seq"], e["hash"]) for e in logs if e["event"] == "audit_entry"]
    lines = path.read_bytes().splitlines(keepends=True)
    assert heads == [(i, hashlib.sha256(line).hexdigest()) for i, line in enumerate(lines, 1)]
    assert verify(path).head == heads[-1][1]


def _line_of(lines: list[bytes], offset: int) -> int:
    end = 0
    for number, line in enumerate(lines, start=1):
        end += len(line)
        if offset < end:
            return number
    raise AssertionError("offset past the end")


def test_flipping_a_byte_in_the_middle_names_the_line(path: Path, full: list[bytes]) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle] ^= 0x01
    path.write_bytes(bytes(data))
    result = verify(path)
    changed = _line_of(full, middle)
    assert not result.ok
    # The changed line itself when it no longer parses, else the next one's prev.
    assert result.first_bad_line in (changed, changed + 1), result
    assert result.entries == result.first_bad_line - 1


def test_a_changed_value_is_named_at_the_next_line(path: Path, full: list[bytes]) -> None:
    lines = list(full)
    lines[4] = lines[4].replace(b'"size":1002', b'"size":1003')  # line 5 still parses
    assert lines[4] != full[4]
    path.write_bytes(b"".join(lines))
    result = verify(path)
    assert (result.ok, result.first_bad_line) == (False, 6)
    assert "line 5" in str(result.problem)


def test_every_single_byte_flip_before_the_last_line_is_found(
    path: Path, full: list[bytes]
) -> None:
    data = path.read_bytes()
    for offset in range(len(data) - len(full[-1])):
        changed = bytearray(data)
        changed[offset] ^= 0x01
        path.write_bytes(bytes(changed))
        assert not verify(path).ok, f"flip at byte {offset} went unnoticed"


@pytest.mark.parametrize("removed", [1, 7, 14])
def test_a_deleted_line_is_named(path: Path, full: list[bytes], removed: int) -> None:
    path.write_bytes(b"".join(full[: removed - 1] + full[removed:]))
    result = verify(path)
    if removed == 14:
        # A line cut off the end leaves a valid, shorter chain: only the head hash kept
        # elsewhere shows it (docs/audit.md).
        assert result.ok and result.head == hashlib.sha256(full[12]).hexdigest()
    else:
        assert (result.ok, result.first_bad_line) == (False, removed)
        assert "seq" in str(result.problem)


def test_an_inserted_forged_line_is_named(path: Path, full: list[bytes]) -> None:
    # A forger who chains his line correctly onto line 5 still breaks line 6.
    forged = {
        "seq": 6,
        "ts": 1.0,
        "kind": "result_file_sent",
        "job_id": "job-1",
        "path": "out/innocent.csv",
        "size": 1,
        "sha256": "f" * 64,
        "prev": hashlib.sha256(full[4]).hexdigest(),
    }
    line = json.dumps(forged, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    path.write_bytes(b"".join([*full[:5], line, *full[5:]]))
    result = verify(path)
    assert (result.ok, result.first_bad_line) == (False, 7)


def test_reordered_lines_are_named(path: Path, full: list[bytes]) -> None:
    lines = list(full)
    lines[3], lines[4] = lines[4], lines[3]
    path.write_bytes(b"".join(lines))
    assert verify(path).first_bad_line == 4


def test_a_reformatted_line_is_named(path: Path, full: list[bytes]) -> None:
    lines = list(full)
    lines[13] = json.dumps(json.loads(lines[13]), sort_keys=True).encode() + b"\n"
    path.write_bytes(b"".join(lines))
    result = verify(path)
    assert result.first_bad_line == 14 and "canonical" in str(result.problem)


def test_a_torn_last_line_is_named_and_skipped_by_read(path: Path, full: list[bytes]) -> None:
    path.write_bytes(b"".join(full)[:-10])
    result = verify(path)
    assert (result.ok, result.first_bad_line, result.entries) == (False, 14, 13)
    assert "incomplete" in str(result.problem)
    assert len(list(read(path))) == 13


def test_read_refuses_a_line_that_is_not_an_entry(path: Path, full: list[bytes]) -> None:
    path.write_bytes(b"".join([*full[:2], b"garbage\n", *full[2:]]))
    with pytest.raises(AuditError, match="line 3"):
        list(read(path))


def test_reopen_cuts_a_torn_tail_and_continues(path: Path, full: list[bytes]) -> None:
    torn = full[-1][:-20]
    path.write_bytes(b"".join(full[:-1]) + torn)
    with capture_logs() as logs, AuditLedger(path) as ledger:
        assert ledger.head[0] == 13
        ledger.job_ended("job-2", "failed", "agent_error", None)
    warning = next(e for e in logs if e["event"] == "audit_torn_tail_truncated")
    assert warning["log_level"] == "warning" and warning["dropped_bytes"] == len(torn)
    result = verify(path)
    assert result.ok and result.entries == 14


def test_reopen_of_a_file_holding_only_a_torn_line_starts_over(path: Path) -> None:
    path.write_bytes(b'{"seq":1,"ts":1.0,"kin')
    with AuditLedger(path) as ledger:
        assert ledger.head == (0, GENESIS)
        ledger.job_ended("job-1", "cancelled", None, None)
    assert verify(path).ok


def test_open_refuses_a_last_line_that_is_not_an_entry(path: Path, full: list[bytes]) -> None:
    path.write_bytes(b"".join(full) + b"not json\n")
    with pytest.raises(AuditError, match="last line"):
        AuditLedger(path)


def test_a_second_writer_is_refused(path: Path) -> None:
    with AuditLedger(path), pytest.raises(AuditError, match="another process"):
        AuditLedger(path)
    AuditLedger(path).close()  # released on close


def test_concurrent_appends_keep_the_chain_dense(path: Path) -> None:
    with AuditLedger(path) as ledger:

        def worker(n: int) -> None:
            for i in range(50):
                ledger.result_file_sent(f"job-{n}", f"f{i}", i, "0" * 64)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    result = verify(path)
    assert result.ok and result.entries == 200
    entries = list(read(path))
    assert [e["seq"] for e in entries] == list(range(1, 201))
    for n in range(4):
        assert [e["path"] for e in entries if e["job_id"] == f"job-{n}"] == [
            f"f{i}" for i in range(50)
        ]


@pytest.mark.parametrize("bad", ["/etc/passwd", "../up", "out/../../x", "", "a\\..\\b"])
def test_a_result_path_outside_the_output_dir_is_refused(path: Path, bad: str) -> None:
    with AuditLedger(path) as ledger, pytest.raises(ValueError, match="not relative"):
        ledger.result_file_sent("job-1", bad, 1, "0" * 64)
    assert path.read_bytes() == b""


def test_a_datastore_is_recorded_by_name_never_by_path(path: Path) -> None:
    with AuditLedger(path) as ledger, pytest.raises(ValueError, match="datastore"):
        ledger.job_assigned("job-1", IMAGE, DIGEST, MODEL, "/srv/data/vitals")
    assert path.read_bytes() == b""


def test_bad_fields_write_nothing(path: Path) -> None:
    with AuditLedger(path) as ledger:
        with pytest.raises(ValueError, match="may not set"):
            ledger.append("note", None, prev="0" * 64)
        with pytest.raises(ValueError, match="kind"):
            ledger.append("Bad Kind", None)
        with pytest.raises(ValueError):
            ledger.append("note", None, value=math.nan)
        with pytest.raises(ValueError, match="sha256"):
            ledger.result_file_sent("job-1", "out.csv", 1, "not-a-digest")
        assert ledger.head == (0, GENESIS)
    assert path.read_bytes() == b""


def test_a_failed_write_leaves_no_partial_entry(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with AuditLedger(path) as ledger:
        one_job(ledger, files=1)
        before = path.read_bytes()

        def full_disk(fd: int) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        with monkeypatch.context() as patched:
            patched.setattr("agent.audit.ledger.os.fsync", full_disk)
            with pytest.raises(AuditError, match="entry 6 not written"):
                ledger.job_ended("job-1", "succeeded", None, 0)
        assert path.read_bytes() == before
        assert ledger.job_ended("job-1", "succeeded", None, 0)["seq"] == 6
    assert verify(path).ok


def test_a_closed_ledger_refuses_appends(path: Path) -> None:
    ledger = AuditLedger(path)
    ledger.close()
    ledger.close()
    with pytest.raises(AuditError, match="closed"):
        ledger.job_ended("job-1", "succeeded", None, 0)


def test_the_rendered_line_shows_the_key_facts(path: Path, full: list[bytes]) -> None:
    lines = [render_entry(e) for e in read(path, "job-1")]
    assert "job_assigned" in lines[0] and IMAGE in lines[0] and "datastore vitals" in lines[0]
    assert "network none" in lines[1] and "/opt/data:ro" in lines[1]
    assert "out/part-0.csv 1000 bytes sha256:000000000000" in lines[2]
    assert "3 file(s), 3003 bytes" in lines[5]
    assert "succeeded, exit code 0" in lines[6]
    assert all(line[:20].endswith("Z") and line[10] == "T" for line in lines)
    other = render_entry({"seq": 1, "ts": 0.0, "kind": "note", "job_id": None, "text": "hi"})
    assert other.startswith("1970-01-01T00:00:00Z") and 'text="hi"' in other


def test_a_result_name_or_image_ref_cannot_move_the_cursor_in_the_view(path: Path) -> None:
    """Attack: a result file named `x ESC[1A ESC[2K forged` (and an image ref with the same)
    erased the egress line above it in `cloudbender-agent audit` and printed a forged
    one. The view escapes every control character; the chain keeps the bytes."""
    csi = "\x1b[1A\x1b[2K"
    with AuditLedger(path) as ledger:
        ledger.job_assigned("job-1", f"evil{csi}registry/ok:1", None, None, None)
        ledger.result_file_sent("job-1", f"a.csv{csi}#3 result_file_sent nothing", 1, "0" * 64)
        ledger.job_ended("job-1\u202e", "failed", f"reason\n{csi}", None)
    lines = [render_entry(e) for e in read(path)]
    assert all(line.isprintable() for line in lines), lines
    assert "\\x1b[1A\\x1b[2K" in lines[0] and "\\x1b[1A\\x1b[2K" in lines[1]
    assert "job-1\\u202e" in lines[2] and "reason\\n" in lines[2]
    assert next(read(path))["image_ref"] == f"evil{csi}registry/ok:1"  # recorded as it was


# --- result egress: each file once per job, resends as byte ranges --------------------


def _sent_kinds(path: Path, job_id: str) -> list[tuple[str, str]]:
    return [
        (e["kind"], e["path"])
        for e in read(path, job_id)
        if e["kind"] in ("result_file_sent", "result_range_resent")
    ]


def test_a_file_is_recorded_once_per_job_even_after_a_restart(path: Path) -> None:
    """Attack (accounting): an upload resumed after an agent restart wrote a second
    `result_file_sent` for the same file, so an auditor adding up the ledger counted
    800 MB where 400 MB left. A file is recorded once per job, across restarts."""
    files = [("out/a.bin", 400_000_000, "a" * 64), ("out/b.csv", 10, "b" * 64)]
    with AuditLedger(path) as ledger:
        ledger.job_assigned("job-1", IMAGE, DIGEST, MODEL, "vitals")
        assert len(ledger.result_files_sent("job-1", files)) == 2
        assert ledger.result_files_sent("job-1", files) == []  # the same delivery again
    with AuditLedger(path) as ledger:  # restarted: the job is known only from the file
        assert ledger.result_files_recorded("job-1") == {"out/a.bin", "out/b.csv"}
        assert ledger.result_files_sent("job-1", [*files, ("out/c", 1, "c" * 64)]) != []
        assert ledger.result_file_sent("job-1", "out/a.bin", 400_000_000, "a" * 64) is None
        ledger.job_assigned("job-1", IMAGE, DIGEST, MODEL, "vitals")  # a new run of the id
        assert ledger.result_files_recorded("job-1") == frozenset()
    assert _sent_kinds(path, "job-1") == [
        ("result_file_sent", "out/a.bin"),
        ("result_file_sent", "out/b.csv"),
        ("result_file_sent", "out/c"),
    ]
    assert verify(path).ok


@pytest.mark.parametrize(
    ("start", "end", "why"), [(5, 5, "session_lost"), (-1, 3, "rejected"), (0, 3, "because")]
)
def test_a_resent_range_must_be_a_range_with_a_cause(
    path: Path, start: int, end: int, why: str
) -> None:
    with AuditLedger(path) as ledger, pytest.raises(ValueError):
        ledger.result_ranges_resent("job-1", [("out/a.bin", start, end, why)])
    assert path.read_bytes() == b""


class _FakeSession:
    """A control plane on the other end of the uploader: holds what it received, drops
    the session once after ``drop_after`` payload bytes (that chunk is lost), rejects
    ``reject`` once, and checks every chunk against the ledger as it arrives."""

    def __init__(self, ledger: Path, uploader: Any, uplink: Any, sizes: list[int]) -> None:
        self.ledger, self.uploader, self.uplink = ledger, uploader, uplink
        self.held = [0] * len(sizes)
        self.seen = [0] * len(sizes)  # the highest byte of each file that ever arrived
        self.received = 0
        self.drop_after: int | None = None
        self.reject: int | None = None
        self.holes: list[str] = []

    async def send(self, message: dict[str, Any]) -> None:
        job = message["job_id"]
        if message["type"] == "result.manifest":
            reply: Any = messages.ResultResume(type="result.resume", job_id=job, offsets=self.held)
        elif self.reject is not None:
            reply = messages.ResultRejected(
                type="result.rejected", job_id=job, file=self.reject, code="checksum_mismatch"
            )
            self.held[self.reject], self.reject = 0, None
        else:
            reply = messages.ResultAccepted(type="result.accepted", job_id=job)
        asyncio.get_running_loop().call_soon(self.uploader.route, reply)

    async def send_frame(self, type_: str, frame: bytes | memoryview) -> None:
        sent = decode_binary(bytes(frame))
        header = sent.header
        index, offset, n = header["file"], header["offset"], len(sent.payload)
        self._check_recorded(header["job_id"], index, offset, offset + n)
        self.seen[index] = max(self.seen[index], offset + n)
        self.received += n
        if self.drop_after is not None and self.received >= self.drop_after:
            self.drop_after = None
            # Back before the uploader notices: it must not wait for this new session's end.
            self.uplink.detach()
            self.uplink.attach(self)
            raise ConnectionError("dropped")
        self.held[index] = offset + n
        ack = messages.ResultAck(
            type="result.ack", job_id=header["job_id"], file=index, offset=offset + n
        )
        asyncio.get_running_loop().call_soon(self.uploader.route, ack)

    def _check_recorded(self, job_id: str, index: int, start: int, end: int) -> None:
        entries = list(read(self.ledger, job_id))
        name = f"f{index}"
        if not any(e["kind"] == "result_file_sent" and e["path"] == name for e in entries):
            self.holes.append(f"{name} sent before it was recorded")
        again = min(end, self.seen[index])
        covered = [
            (e["start"], e["end"])
            for e in entries
            if e["kind"] == "result_range_resent" and e["path"] == name
        ]
        if start < again and not any(s <= start and again <= e for s, e in covered):
            self.holes.append(f"{name} bytes {start}-{again - 1} sent again unrecorded")


def _deliver(
    tmp_path: Path,
    sizes: list[int],
    *,
    held: list[int] | None = None,
    restarted: bool = False,
    drop_after: int | None = None,
    reject: int | None = None,
) -> tuple[_FakeSession, Path]:
    """Spool ``sizes`` for job-1 (once) and deliver them to a :class:`_FakeSession`
    holding ``held``. ``restarted``: a second run of the agent (no new job_assigned; the
    control plane saw every byte before)."""
    spool = Spool(tmp_path / "spool")
    target = spool.data_path("job-1")  # every file packed in order, as Spool.store does
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"".join(os.urandom(size) for size in sizes))
    data, files, at = target.read_bytes(), [], 0
    for i, size in enumerate(sizes):
        files.append(ResultFile(i, f"f{i}", size, hashlib.sha256(data[at : at + size]).hexdigest()))
        at += size
    path = ledger_path(tmp_path)

    async def main() -> _FakeSession:
        uplink = Uplink()
        with AuditLedger(path) as ledger:
            if not restarted:
                ledger.job_assigned("job-1", IMAGE, DIGEST, MODEL, "vitals")
            uploader = Uploader(uplink, spool, ledger=ledger)
            session = _FakeSession(path, uploader, uplink, sizes)
            session.drop_after, session.reject = drop_after, reject
            if held is not None:
                session.held = list(held)
            if restarted:
                session.seen = list(sizes)
            uplink.attach(session)
            await asyncio.wait_for(uploader.deliver(Manifest("job-1", tuple(files))), 30)
        return session

    return asyncio.run(main()), path


MIB = 1024 * 1024


def test_a_dropped_session_records_the_resent_range_before_it_goes(tmp_path: Path) -> None:
    """Attack (accounting): the session dropped mid-upload and the agent sent the bytes
    the control plane had not kept a second time without a word in the ledger, so more
    left than it showed. Each file stays recorded once; the range sent again is recorded
    as `result_range_resent`, before those bytes go."""
    session, path = _deliver(tmp_path, [3 * MIB + 7, 100], drop_after=2 * MIB + 1)
    assert session.holes == []
    assert _sent_kinds(path, "job-1") == [
        ("result_file_sent", "f0"),
        ("result_file_sent", "f1"),
        ("result_range_resent", "f0"),
    ]
    (resent,) = [e for e in read(path, "job-1") if e["kind"] == "result_range_resent"]
    # The third chunk was lost with the session: exactly it left twice.
    assert (resent["start"], resent["end"], resent["why"]) == (2 * MIB, 3 * MIB, "session_lost")


def test_a_rejected_file_is_recorded_as_resent_whole(tmp_path: Path) -> None:
    """Attack (accounting): a file the control plane rejected went again from byte 0 with
    no entry, so the ledger showed half of what left."""
    session, path = _deliver(tmp_path, [10, MIB + 1], reject=1)
    assert session.holes == []
    resent = [
        (e["path"], e["start"], e["end"], e["why"])
        for e in read(path, "job-1")
        if e["kind"] == "result_range_resent"
    ]
    assert resent == [("f1", 0, MIB + 1, "rejected")]
    assert [k for k, _ in _sent_kinds(path, "job-1")].count("result_file_sent") == 2


def test_a_delivery_after_a_restart_records_no_file_twice(tmp_path: Path) -> None:
    """Attack (accounting): the agent restarted mid-upload and the next run wrote a second
    `result_file_sent` per file, doubling the bytes an auditor counts. It writes none, and
    records what it sends again, to the end of each file (how far the last run got is
    not known)."""
    _deliver(tmp_path, [MIB, 5])
    session, path = _deliver(tmp_path, [MIB, 5], held=[MIB // 2, 0], restarted=True)
    assert session.holes == []
    assert [k for k, _ in _sent_kinds(path, "job-1")] == [
        "result_file_sent",
        "result_file_sent",
        "result_range_resent",
        "result_range_resent",
    ]
    resent = [
        (e["path"], e["start"], e["end"], e["why"])
        for e in read(path, "job-1")
        if e["kind"] == "result_range_resent"
    ]
    assert resent == [("f0", MIB // 2, MIB, "agent_restarted"), ("f1", 0, 5, "agent_restarted")]
    assert verify(path).ok
