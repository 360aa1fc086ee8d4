"""``cloudbender-agent audit`` as a person runs it, against a ledger in the config's state dir."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from agent.audit import AuditError, AuditLedger, ledger_path
from agent.jobs.store import AuditAnchor, JobStore, store_path
from tests.helpers.env import valid_config, write_config
from tests.helpers.proc import agent_command, run_cli
from tests.unit.test_audit import one_job


def _audit(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("audit", "--config", str(config), *args)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    cfg = valid_config(tmp_path)
    Path(cfg["state_dir"]).mkdir()
    return write_config(tmp_path, cfg)


@pytest.fixture
def ledger(config: Path, tmp_path: Path) -> Path:
    path = ledger_path(tmp_path / "state")
    with AuditLedger(path) as writer:
        one_job(writer, "job-1")
        one_job(writer, "job-2")
    return path


def test_help_lists_audit() -> None:
    proc = run_cli("audit", "--help")
    assert proc.returncode == 0
    for option in ("--job", "--json", "--verify", "--config"):
        assert option in proc.stdout


def test_audit_shows_one_line_per_entry(config: Path, ledger: Path) -> None:
    proc = _audit(config)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 14
    assert "job_assigned" in lines[0] and "job-1" in lines[0] and "datastore vitals" in lines[0]
    assert "out/part-2.csv 1002 bytes" in lines[4]
    assert "job_ended" in lines[-1] and "job-2" in lines[-1]


def test_audit_job_shows_only_that_job(config: Path, ledger: Path) -> None:
    proc = _audit(config, "--job", "job-2")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 7 + 5 and all("job-2" in line for line in lines[:7])
    assert lines[7:9] == [
        "",
        "job job-2: 3 result file(s), 3003 bytes sent once, 0 bytes sent again, "
        "at most 3003 bytes left this site",
    ]
    none = _audit(config, "--job", "job-9")
    assert (none.returncode, none.stdout) == (0, "")
    assert "no entries for job job-9" in none.stderr


def test_audit_json_prints_the_ledger_lines(config: Path, ledger: Path) -> None:
    proc = _audit(config, "--json", "--job", "job-1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.encode() == b"".join(ledger.read_bytes().splitlines(keepends=True)[:7])
    assert [json.loads(line)["seq"] for line in proc.stdout.splitlines()] == list(range(1, 8))


def test_verify_passes_then_fails_after_a_flipped_byte_or_a_deleted_line(
    config: Path, ledger: Path
) -> None:
    intact = ledger.read_bytes()
    proc = _audit(config, "--verify")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("OK: 14 entries, chain intact")

    flipped = bytearray(intact)
    flipped[len(flipped) // 2] ^= 0x01
    ledger.write_bytes(bytes(flipped))
    proc = _audit(config, "--verify")
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"audit ledger {ledger}: line ")
    bad_line = int(proc.stderr.split("line ")[1].split(":")[0])
    changed = intact[: len(intact) // 2].count(b"\n") + 1
    assert bad_line in (changed, changed + 1), proc.stderr

    lines = intact.splitlines(keepends=True)
    ledger.write_bytes(b"".join(lines[:9] + lines[10:]))
    proc = _audit(config, "--verify")
    assert proc.returncode == 1
    assert f"audit ledger {ledger}: line 10: seq is 11 where 10 was expected" in proc.stderr


def test_verify_json_reports_the_first_bad_line(config: Path, ledger: Path) -> None:
    lines = ledger.read_bytes().splitlines(keepends=True)
    ledger.write_bytes(b"".join([lines[1], lines[0], *lines[2:]]))
    proc = _audit(config, "--verify", "--json")
    assert proc.returncode == 1
    document = json.loads(proc.stdout)
    assert (document["ok"], document["first_bad_line"], document["entries"]) == (False, 1, 0)


def test_no_ledger_yet_is_not_an_error(config: Path) -> None:
    show = _audit(config)
    assert (show.returncode, show.stdout) == (0, "")
    assert "no entries yet" in show.stderr
    check = _audit(config, "--verify")
    assert check.returncode == 0 and "no ledger yet" in check.stdout


def test_a_line_that_is_not_an_entry_fails_show_and_points_to_verify(
    config: Path, ledger: Path
) -> None:
    ledger.write_bytes(b"garbage\n" + ledger.read_bytes())
    proc = _audit(config)
    assert proc.returncode == 1
    assert "line 1 is not a ledger entry" in proc.stderr and "--verify" in proc.stderr


def test_an_invalid_config_exits_78(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("state_dir: [1, 2]\nnope: true\n")
    proc = _audit(bad, "--verify")
    assert proc.returncode == 78


def _anchored(state: Path) -> AuditLedger:
    JobStore(store_path(state)).close()  # the agent's job store, as the daemon opens it
    return AuditLedger(ledger_path(state), AuditAnchor(store_path(state)))


def test_an_escape_sequence_in_a_name_cannot_forge_a_line(config: Path, tmp_path: Path) -> None:
    """Attack: a result file named `ESC[1A ESC[2K` plus a forged egress line, and an image
    ref of the same kind: `cloudbender-agent audit` printed them raw, so the terminal
    erased the real line above and showed the forged one. No raw ESC reaches stdout."""
    csi = "\x1b[1A\x1b[2K"
    with AuditLedger(ledger_path(tmp_path / "state")) as writer:
        writer.job_assigned("job-1", f"busybox{csi}", None, None, "vitals")
        writer.result_file_sent("job-1", "secret-data.csv", 9_000_000, "1" * 64)
        writer.result_file_sent("job-1", f"x{csi}#2  result_file_sent job-1  ok.csv", 1, "2" * 64)
    proc = subprocess.run(
        [*agent_command(), "audit", "--config", str(config)],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert b"\x1b" not in proc.stdout and b"\x9b" not in proc.stdout
    lines = proc.stdout.decode().splitlines()
    assert len(lines) == 3 and "secret-data.csv 9000000 bytes" in lines[1]
    assert "x\\x1b[1A\\x1b[2K#2" in lines[2] and "busybox\\x1b[1A\\x1b[2K" in lines[0]
    as_json = _audit(config, "--json")  # scripts get the exact value back
    assert json.loads(as_json.stdout.splitlines()[2])["path"].startswith(f"x{csi}")


def test_verify_fails_for_a_deleted_ledger_the_store_knew(config: Path, tmp_path: Path) -> None:
    """Attack: job id `..` emptied the state directory; after a restart `audit --verify`
    said "OK: 0 entries". With the job store's anchor it fails and says why."""
    state = tmp_path / "state"
    with _anchored(state) as writer:
        one_job(writer, "job-1")
    ledger_path(state).unlink()
    proc = _audit(config, "--verify")
    assert proc.returncode == 1
    assert proc.stdout.startswith("FAILED: the ledger is missing or empty")
    assert (
        "records 7 entries" in proc.stdout and f"audit ledger {ledger_path(state)}" in proc.stderr
    )


def test_verify_fails_for_a_ledger_cut_short_at_a_line(config: Path, tmp_path: Path) -> None:
    """Attack: whole lines cut off the end leave a valid, shorter chain."""
    state = tmp_path / "state"
    with _anchored(state) as writer:
        one_job(writer, "job-1")
        one_job(writer, "job-2")
    lines = ledger_path(state).read_bytes().splitlines(keepends=True)
    ledger_path(state).write_bytes(b"".join(lines[:9]))
    proc = _audit(config, "--verify", "--json")
    assert proc.returncode == 1
    document = json.loads(proc.stdout)
    assert (document["ok"], document["entries"], document["first_bad_line"]) == (False, 9, 10)
    assert "ends at entry 9" in document["problem"] and "14 entries" in document["problem"]


def test_reset_anchor_lets_a_new_ledger_start_on_purpose(config: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    with _anchored(state) as writer:
        one_job(writer, "job-1")
    ledger_path(state).unlink()
    with pytest.raises(AuditError, match="missing or empty"):
        _anchored(state)
    with AuditLedger(ledger_path(state)):  # a running agent holds the ledger
        held = _audit(config, "--reset-anchor")
    assert held.returncode == 1 and "held by another process" in held.stderr
    proc = _audit(config, "--reset-anchor")
    assert proc.returncode == 0, proc.stderr
    assert "had recorded 7 entries" in proc.stdout
    with _anchored(state) as writer:
        assert writer.head[0] == 0
        one_job(writer, "job-2")
    assert _audit(config, "--verify").stdout.startswith("OK: 7 entries")


def test_audit_job_adds_up_each_file_once_and_resent_ranges_apart(
    config: Path, tmp_path: Path
) -> None:
    """Attack (accounting): a 400 MB result resumed after a restart was listed twice, and
    an auditor could not tell whether 400 or 800 MB left. `audit --job` adds each file
    once and the bytes sent again apart, also for a ledger an older agent wrote with a
    duplicate `result_file_sent`."""
    big = 400 * 1000 * 1000
    with AuditLedger(ledger_path(tmp_path / "state")) as writer:
        writer.job_assigned("job-1", "busybox", None, None, "vitals")
        writer.result_files_sent("job-1", [("a.bin", big, "a" * 64), ("b.csv", 10, "b" * 64)])
        writer.result_ranges_resent("job-1", [("a.bin", 100, 1100, "session_lost")])
        writer.append("result_file_sent", "job-1", path="a.bin", size=big, sha256="a" * 64)
        writer.job_ended("job-1", "succeeded", None, 0)
    proc = _audit(config, "--job", "job-1")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "result_range_resent" in lines[3] and "a.bin bytes 100-1099 again" in lines[3]
    assert lines[-3] == (
        "job job-1: 2 result file(s), 400000010 bytes sent once, 1000 bytes sent again, "
        "at most 400001010 bytes left this site"
    )
    assert lines[-2].startswith("  a.bin  400000000 bytes sha256:aaaaaaaaaaaa…")
    assert "recorded 2 times" in lines[-2] and "again bytes 100-1099 (session_lost)" in lines[-2]
    assert lines[-1] == "  b.csv  10 bytes sha256:bbbbbbbbbbbb…"
    as_json = _audit(config, "--json", "--job", "job-1")  # scripts get the lines as they are
    assert len(as_json.stdout.splitlines()) == 6
