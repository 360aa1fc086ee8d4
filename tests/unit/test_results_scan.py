"""The output gate on a real file system: only regular files, inside, within limits."""

from __future__ import annotations

import hashlib
import os
import socket
import stat
import time
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


def test_nested_files_are_moved_into_the_spool_and_hashed(tmp_path: Path, out: Path) -> None:
    (out / "b" / "c").mkdir(parents=True)
    (out / "scores.csv").write_bytes(b"1,2,3\n")
    (out / "b" / "c" / "deep.bin").write_bytes(os.urandom(3_000_000))
    (out / "empty").write_bytes(b"")
    (out / "b" / "empty-dir").mkdir()
    originals = {p: (out / p).read_bytes() for p in ("b/c/deep.bin", "empty", "scores.csv")}
    spool = Spool(tmp_path / "spool")
    manifest = spool.store("j-1", out, BIG, 100)
    assert [f.path for f in manifest.files] == ["b/c/deep.bin", "empty", "scores.csv"]
    for f in manifest.files:
        original = originals[f.path]
        spooled = spool.file_path("j-1", f.index).read_bytes()
        assert spooled == original
        assert f.sha256 == hashlib.sha256(original).hexdigest()
        assert f.size == len(original)
    assert manifest.total_bytes == 3_000_006
    assert spool.load("j-1") == manifest
    assert stat.S_IMODE(spool.file_path("j-1", 0).stat().st_mode) == 0o600
    assert not (out / "scores.csv").exists()  # moved: the job's directory keeps no copy


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
    with pytest.raises(ResultInvalid, match="changed after it was checked"):
        copy_into_spool(out, checked, tmp_path / "spool-files")
    assert not (tmp_path / "spool-files" / "0").exists()


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
