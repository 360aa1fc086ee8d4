"""The output gate on a real file system: only regular files, inside, within limits."""

from __future__ import annotations

import hashlib
import os
import socket
import stat
import tempfile
import time
import tracemalloc
from pathlib import Path

import pytest

from agent.results.scan import ResultInvalid, ResultTooLarge, check_output
from agent.results.spool import Spool

BIG = 10**9


@pytest.fixture
def out(tmp_path: Path) -> Path:
    path = tmp_path / "job" / "output"
    path.mkdir(parents=True)
    return path


def test_nested_files_are_copied_into_the_spool_and_hashed(tmp_path: Path, out: Path) -> None:
    (out / "b" / "c").mkdir(parents=True)
    (out / "scores.csv").write_bytes(b"1,2,3\n")
    (out / "b" / "c" / "deep.bin").write_bytes(os.urandom(3_000_000))
    (out / "empty").write_bytes(b"")
    (out / "b" / "empty-dir").mkdir()
    originals = {p: (out / p).read_bytes() for p in ("b/c/deep.bin", "empty", "scores.csv")}
    spool = Spool(tmp_path / "spool")
    manifest = spool.store("j-1", out, BIG, 100)
    assert [f.path for f in manifest.files] == ["b/c/deep.bin", "empty", "scores.csv"]
    data = spool.data_path("j-1").read_bytes()
    for f, start in zip(manifest.files, manifest.offsets, strict=True):
        original = originals[f.path]
        spooled = data[start : start + f.size]
        assert spooled == original
        assert f.sha256 == hashlib.sha256(original).hexdigest()
        assert f.size == len(original)
    assert manifest.total_bytes == 3_000_006 == len(data)
    assert spool.load("j-1") == manifest
    assert stat.S_IMODE(spool.data_path("j-1").stat().st_mode) == 0o600
    # Copied, never moved: the output stays whole until the caller removes it, once the
    # manifest is durable (a crash before then must lose nothing).
    assert {p: (out / p).read_bytes() for p in originals} == originals


def test_empty_output(tmp_path: Path, out: Path) -> None:
    manifest = Spool(tmp_path / "spool").store("j-1", out, BIG, 100)
    assert manifest.files == ()
    assert manifest.to_message() == {
        "type": "result.manifest",
        "job_id": "j-1",
        "total_bytes": 0,
        "files": [],
    }


def test_symlink_to_host_file_is_refused(tmp_path: Path, out: Path) -> None:
    (out / "passwd").symlink_to("/etc/passwd")
    with pytest.raises(ResultInvalid, match="passwd is a symbolic link"):
        Spool(tmp_path / "spool").store("j-1", out, BIG, 100)
    assert not (tmp_path / "spool" / "j-1").exists()


def test_symlinked_subdirectory_is_refused(tmp_path: Path, out: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("host data")
    (out / "sub").symlink_to(outside)
    with pytest.raises(ResultInvalid, match="sub is a symbolic link"):
        check_output(out, BIG, 100)


def test_output_dir_itself_a_link_is_refused(tmp_path: Path) -> None:
    (tmp_path / "output").symlink_to("/etc")
    with pytest.raises(ResultInvalid):
        check_output(tmp_path / "output", BIG, 100)


def test_fifo_is_refused_without_blocking(out: Path) -> None:
    os.mkfifo(out / "pipe")
    with pytest.raises(ResultInvalid, match="pipe is a FIFO"):
        check_output(out, BIG, 100)


def test_socket_is_refused(out: Path) -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(out / "sock"))
        with pytest.raises(ResultInvalid, match="sock is a socket"):
            check_output(out, BIG, 100)


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod needs root")
def test_device_is_refused(out: Path) -> None:
    os.mknod(out / "null", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    with pytest.raises(ResultInvalid, match="null is a character device"):
        check_output(out, BIG, 100)


def test_too_many_bytes_or_files(out: Path) -> None:
    (out / "a").write_bytes(b"x" * 600)
    (out / "b").write_bytes(b"x" * 600)
    with pytest.raises(ResultTooLarge, match="larger than allowed"):
        check_output(out, 1000, 100)
    with pytest.raises(ResultTooLarge, match="more result files than allowed"):
        check_output(out, BIG, 1)
    assert check_output(out, 1200, 2) == [("a", 600), ("b", 600)]


def test_name_that_is_not_utf8_is_refused(out: Path) -> None:
    os.close(os.open(os.path.join(os.fsencode(out), b"bad-\xff"), os.O_CREAT | os.O_WRONLY))
    with pytest.raises(ResultInvalid, match="not UTF-8"):
        check_output(out, BIG, 100)


def test_a_file_swapped_for_a_link_after_the_check_is_refused(tmp_path: Path, out: Path) -> None:
    from agent.results.scan import copy_into_spool

    (out / "a").write_bytes(b"data")
    checked = check_output(out, BIG, 100)
    (out / "a").unlink()
    (out / "a").symlink_to("/etc/passwd")
    with pytest.raises(ResultInvalid, match="cannot be opened as a regular file"):
        copy_into_spool(out, checked, tmp_path / "spool" / "data")
    assert not (tmp_path / "spool" / "data").exists()


def test_deep_nesting_is_refused_not_a_crash(out: Path) -> None:
    deep = out
    for _ in range(70):
        deep = deep / "d"
    deep.mkdir(parents=True)
    with pytest.raises(ResultInvalid, match="nested deeper than 64"):
        check_output(out, BIG, 100_000)


def test_delivered_results_are_deleted_after_retention(tmp_path: Path, out: Path) -> None:
    (out / "a").write_bytes(b"x")
    spool = Spool(tmp_path / "spool")
    spool.store("j-old", out, BIG, 100)
    spool.mark_delivered("j-old")
    now = time.time()
    assert spool.purge_delivered(retention_s=3600, now=now) == []
    assert spool.load("j-old") is not None
    (tmp_path / "out2").mkdir()
    spool.store("j-pending", tmp_path / "out2", BIG, 100)  # not delivered: kept
    assert spool.purge_delivered(retention_s=3600, now=now + 3601) == ["j-old"]
    assert spool.load("j-old") is None
    assert spool.load("j-pending") is not None


@pytest.mark.parametrize(
    "name",
    [
        "scores.csv\x1b[1A\x1b[2Kforged.csv",  # cursor up, erase line: rewrites the audit view
        "report\u202etxt.exe",  # right-to-left override: shows as report-exe.txt
        "two\nlines",  # a forged second line in a log or the audit view
        "del\x7f",
        "c1\x9b2K",  # 8-bit CSI, the one-byte form of ESC [
        "zero\u200bwidth",
        "back\\slash",  # the ledger refuses it as a path separator
    ],
)
def test_a_name_that_could_rewrite_a_terminal_is_refused(out: Path, name: str) -> None:
    """Attack: a job names a result file with ESC[1A ESC[2K (or a bidi override, a
    newline, a C1 CSI) so that `cloudbender-agent audit` erases the real egress line and
    shows a forged one. The gate refuses the name; the refusal shows it escaped."""
    (out / "sub").mkdir()
    (out / "sub" / name).write_bytes(b"x")
    with pytest.raises(ResultInvalid, match=r"^sub/") as caught:
        check_output(out, BIG, 100)
    message = str(caught.value)
    assert message.isprintable(), message
    assert name not in message


def test_a_printable_unicode_name_is_kept(out: Path) -> None:
    (out / "résultats-été.csv").write_bytes(b"x")
    assert check_output(out, BIG, 100) == [("résultats-été.csv", 1)]


def test_a_huge_directory_is_refused_without_reading_it_all(out: Path) -> None:
    """Attack: a job writes a directory of 100,000 empty files; the gate used to read and
    sort every name before counting (one million took the agent from 53 to 327 MiB). It
    must stop at the budget: its memory stays that of a few names (the names alone
    weigh about 15 MiB), not of the directory."""
    # tmpfs when there is one: creating 100,000 files on a busy disk takes a minute.
    shm = Path("/dev/shm")
    with tempfile.TemporaryDirectory(dir=shm if shm.is_dir() else out) as where:
        huge = Path(where) / "output"
        huge.mkdir()
        pad = "x" * 100
        for i in range(100_000):
            os.close(os.open(huge / f"{i:08d}{pad}", os.O_CREAT | os.O_WRONLY, 0o600))
        tracemalloc.start()
        try:
            with pytest.raises(ResultTooLarge, match="more result files than allowed"):
                check_output(huge, BIG, 10)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert peak < 5 * 1024 * 1024, f"peak {peak / 1024 / 1024:.1f} MiB"


def test_many_directories_are_refused_at_the_budget(out: Path) -> None:
    """Attack: empty directories cost a walk too; 50 of them with max_files=10 must be
    refused, not walked."""
    for i in range(50):
        (out / f"d{i}").mkdir()
    with pytest.raises(ResultTooLarge, match="too many directories"):
        check_output(out, BIG, 10)


def test_the_manifest_stays_in_path_order_across_directories(out: Path) -> None:
    for rel in ("b/2", "a", "b/1", "c/z/9", "B"):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(b"")
    assert [p for p, _ in check_output(out, BIG, 10)] == ["B", "a", "b/1", "b/2", "c/z/9"]
