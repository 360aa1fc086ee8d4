"""The ledger's anchor in the job store, and a ledger deleted or replaced under the agent."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from agent.audit import AuditError, AuditLedger, ledger_path, verify
from agent.jobs.store import AuditAnchor, JobStore, StoreError, read_audit_anchor, store_path
from tests.unit.test_audit import one_job


@pytest.fixture
def state(tmp_path: Path) -> Path:
    JobStore(store_path(tmp_path)).close()  # the agent opens its job store first
    return tmp_path


def open_ledger(state: Path) -> AuditLedger:
    return AuditLedger(ledger_path(state), AuditAnchor(store_path(state)))


@pytest.fixture
def lines(state: Path) -> list[bytes]:
    """Two jobs (14 entries) written by an anchored ledger, closed; its lines."""
    with open_ledger(state) as ledger:
        one_job(ledger, "job-1")
        one_job(ledger, "job-2")
    return ledger_path(state).read_bytes().splitlines(keepends=True)


def test_each_append_moves_the_anchor_to_the_head(state: Path, lines: list[bytes]) -> None:
    head = hashlib.sha256(lines[-1]).hexdigest()
    assert read_audit_anchor(store_path(state)) == (14, head)
    assert verify(ledger_path(state), (14, head)).ok


def test_a_deleted_ledger_is_refused_at_open_and_fails_verify(
    state: Path, lines: list[bytes]
) -> None:
    """Attack: job id `..` emptied the state directory; after a restart the agent made a
    new, empty ledger and `audit --verify` said "OK: 0 entries". The anchor remembers."""
    ledger_path(state).unlink()
    with capture_logs() as logs, pytest.raises(AuditError, match="missing or empty"):
        open_ledger(state)
    assert any(e["event"] == "audit_ledger_lost" for e in logs)
    anchor = read_audit_anchor(store_path(state))
    assert anchor is not None and anchor[0] == 14  # refusing did not move the anchor
    result = verify(ledger_path(state), anchor)  # the refused open left an empty file
    assert not result.ok and "14 entries" in str(result.problem)
    ledger_path(state).unlink()
    missing = verify(ledger_path(state), anchor)
    assert (missing.ok, missing.first_bad_line) == (False, 1)


def test_a_ledger_cut_at_a_line_boundary_is_refused(state: Path, lines: list[bytes]) -> None:
    """Attack: the last entries (the files that left) are cut off whole lines; the shorter
    chain is valid on its own, so only the anchor shows it."""
    ledger_path(state).write_bytes(b"".join(lines[:10]))
    assert verify(ledger_path(state)).ok
    with pytest.raises(AuditError, match="ends at entry 10"):
        open_ledger(state)
    result = verify(ledger_path(state), read_audit_anchor(store_path(state)))
    assert (result.ok, result.entries, result.first_bad_line) == (False, 10, 11)


def test_a_rewritten_chain_of_the_same_length_is_refused(state: Path, lines: list[bytes]) -> None:
    """Attack: the ledger is replaced by another valid chain (one written from scratch
    with an entry changed and every hash recomputed)."""
    other = state / "other"
    other.mkdir()
    with AuditLedger(ledger_path(other)) as forged:
        one_job(forged, "job-1")
        one_job(forged, "job-x")
    ledger_path(other).replace(ledger_path(state))
    with pytest.raises(AuditError, match="entry 14 is not the one"):
        open_ledger(state)
    result = verify(ledger_path(state), read_audit_anchor(store_path(state)))
    assert (result.ok, result.first_bad_line) == (False, 14)


def test_an_anchor_lagging_by_a_crash_is_brought_up_to_date(
    state: Path, lines: list[bytes]
) -> None:
    # A crash between the ledger's fsync and the anchor's commit: the file is ahead.
    anchor = AuditAnchor(store_path(state))
    anchor.save(11, hashlib.sha256(lines[10]).hexdigest())
    anchor.close()
    with open_ledger(state) as ledger:
        assert ledger.head[0] == 14
    assert read_audit_anchor(store_path(state)) == (14, hashlib.sha256(lines[-1]).hexdigest())


def test_a_lagging_anchor_that_does_not_match_is_refused(state: Path, lines: list[bytes]) -> None:
    anchor = AuditAnchor(store_path(state))
    anchor.save(11, "0" * 64)
    anchor.close()
    with pytest.raises(AuditError, match="entry 11 is not the one"):
        open_ledger(state)


def test_an_existing_ledger_without_an_anchor_is_adopted(state: Path) -> None:
    with AuditLedger(ledger_path(state)) as plain:  # written before anchors existed
        one_job(plain)
    with open_ledger(state) as ledger:
        assert read_audit_anchor(store_path(state)) == ledger.head


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_ledger_deleted_or_replaced_while_open_refuses_every_append(
    state: Path, how: str
) -> None:
    """Attack: the ledger is unlinked (or swapped for another file) under the running
    agent; results used to go out recorded only in an unlinked file nobody can read."""
    path = ledger_path(state)
    with open_ledger(state) as ledger:
        one_job(ledger, files=1)
        path.unlink()
        if how == "replaced":
            path.write_bytes(b"")
        with capture_logs() as logs, pytest.raises(AuditError, match=f"was {how}"):
            ledger.result_file_sent("job-2", "out.csv", 1, "0" * 64)
        assert [e["what"] for e in logs if e["event"] == "audit_ledger_replaced"] == [how]
        with pytest.raises(AuditError):  # and the next one too: nothing is recorded
            ledger.job_ended("job-2", "failed", "agent_error", None)
        assert ledger.head[0] == 5
    assert not path.exists() or path.read_bytes() == b""


class _FailingAnchor:
    def __init__(self) -> None:
        self.fail = False
        self.saved: list[tuple[int, str]] = []

    def load(self) -> tuple[int, str] | None:
        return self.saved[-1] if self.saved else None

    def save(self, seq: int, head: str) -> None:
        if self.fail:
            raise StoreError("job store write failed: disk I/O error")
        self.saved.append((seq, head))

    def close(self) -> None:
        pass


def test_an_append_whose_anchor_cannot_be_saved_is_taken_back(tmp_path: Path) -> None:
    anchor = _FailingAnchor()
    path = ledger_path(tmp_path)
    with AuditLedger(path, anchor) as ledger:
        one_job(ledger, files=1)
        before = path.read_bytes()
        anchor.fail = True
        with pytest.raises(AuditError, match="anchor could not be saved"):
            ledger.job_ended("job-1", "succeeded", None, 0)
        assert path.read_bytes() == before and ledger.head[0] == 5
        anchor.fail = False
        assert ledger.job_ended("job-1", "succeeded", None, 0)["seq"] == 6
    assert verify(path, anchor.saved[-1]).ok


def test_the_read_only_reader_creates_nothing(tmp_path: Path) -> None:
    assert read_audit_anchor(store_path(tmp_path)) is None
    assert not store_path(tmp_path).exists()
    JobStore(store_path(tmp_path)).close()
    assert read_audit_anchor(store_path(tmp_path)) is None  # a store without the table
