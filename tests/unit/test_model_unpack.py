"""Safe unpacking of model archives: what is refused leaves nothing behind."""

from __future__ import annotations

import gzip
import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from agent.errors import ModelArchiveUnsafe, ModelUnavailable
from agent.models.unpack import MAX_DEPTH, MAX_META_BYTES, MAX_PATH_BYTES, unpack

CAP = 10 * 1024 * 1024


def _file(name: str, data: bytes, mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    return info, data


def _special(name: str, type_: bytes, **attrs: object) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = type_
    for key, value in attrs.items():
        setattr(info, key, value)
    return info, b""


def archive(
    path: Path,
    members: list[tuple[tarfile.TarInfo, bytes]],
    *,
    gz: bool = False,
    format_: int = tarfile.GNU_FORMAT,
) -> Path:
    """Write members exactly as given (tarfile writes what it is told; nothing is checked)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=format_) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    path.write_bytes(gzip.compress(raw.getvalue()) if gz else raw.getvalue())
    return path


def _model_members() -> list[tuple[tarfile.TarInfo, bytes]]:
    top = tarfile.TarInfo("./")
    top.type, top.mode = tarfile.DIRTYPE, 0o700
    sub = tarfile.TarInfo("weights")
    sub.type, sub.mode = tarfile.DIRTYPE, 0o700
    return [
        (top, b""),
        (sub, b""),
        _file("./weights/layer0.bin", b"\x00" * 1000, mode=0o4755),  # setuid: dropped
        _file("config.json", b'{"k": 1}', mode=0o600),  # unreadable by the job: fixed
        _file("deep/er/predict.py", b"print('hi')\n", mode=0o777),  # implicit parents
    ]


@pytest.mark.parametrize("gz", [False, True], ids=["tar", "tar.gz"])
def test_plain_and_gzip_archives_unpack_with_normalised_modes(tmp_path: Path, gz: bool) -> None:
    src = archive(tmp_path / "m.tar", _model_members(), gz=gz)
    dest = tmp_path / "out"
    total = unpack(src, dest, max_bytes=CAP)
    assert total == 1000 + 8 + 12
    assert (dest / "weights" / "layer0.bin").read_bytes() == b"\x00" * 1000
    assert (dest / "config.json").read_bytes() == b'{"k": 1}'
    assert (dest / "deep" / "er" / "predict.py").read_text() == "print('hi')\n"
    for dirpath, _dirs, filenames in os.walk(dest):
        assert stat.S_IMODE(os.stat(dirpath).st_mode) == 0o755, dirpath
        for name in filenames:
            mode = os.lstat(os.path.join(dirpath, name)).st_mode
            assert stat.S_ISREG(mode) and stat.S_IMODE(mode) == 0o644, name
    assert os.stat(dest / "config.json").st_uid == os.geteuid()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".unpack")] == []


def test_modes_do_not_depend_on_the_umask(tmp_path: Path) -> None:
    src = archive(tmp_path / "m.tar", _model_members())
    old = os.umask(0o077)
    try:
        unpack(src, tmp_path / "out", max_bytes=CAP)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "out" / "deep").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(tmp_path / "out" / "config.json").st_mode) == 0o644


UNSAFE = {
    "dotdot": [_file("ok.txt", b"fine"), _file("../x", b"escape")],
    "dotdot-inside": [_file("a/../../x", b"escape")],
    "absolute": [_file("ok.txt", b"fine"), _file("/etc/x", b"owned")],
    "symlink": [_file("ok.txt", b"fine"), _special("link", tarfile.SYMTYPE, linkname="ok.txt")],
    "symlink-out": [_special("link", tarfile.SYMTYPE, linkname="/etc/passwd")],
    "hardlink": [_file("ok.txt", b"fine"), _special("hard", tarfile.LNKTYPE, linkname="ok.txt")],
    "chardev": [_special("null", tarfile.CHRTYPE, devmajor=1, devminor=3)],
    "blockdev": [_special("sda", tarfile.BLKTYPE, devmajor=8, devminor=0)],
    "fifo": [_file("ok.txt", b"fine"), _special("pipe", tarfile.FIFOTYPE)],
    "duplicate": [_file("a.txt", b"one"), _file("a.txt", b"two")],
    "file-then-dir": [_file("a", b"one"), _file("a/b", b"two")],
}


@pytest.mark.parametrize("name", sorted(UNSAFE))
def test_unsafe_members_are_refused_and_nothing_is_extracted(tmp_path: Path, name: str) -> None:
    src = archive(tmp_path / "bad.tar.gz", UNSAFE[name], gz=True)
    dest = tmp_path / "out"
    with pytest.raises(ModelArchiveUnsafe) as info:
        unpack(src, dest, max_bytes=CAP)
    assert isinstance(info.value, ModelUnavailable)  # reported as model_unavailable
    assert info.value.reason == "model_unavailable"
    assert not dest.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tar.gz"]
    assert not (tmp_path.parent / "x").exists()


def test_total_size_cap_is_enforced_before_writing(tmp_path: Path) -> None:
    src = archive(tmp_path / "big.tar", [_file("a", b"x" * 600), _file("b", b"y" * 600)])
    with pytest.raises(ModelArchiveUnsafe, match="more than 1000 bytes"):
        unpack(src, tmp_path / "out", max_bytes=1000)
    assert not (tmp_path / "out").exists()
    unpack(src, tmp_path / "ok", max_bytes=1200)


def test_gzip_bomb_is_refused_by_its_declared_size(tmp_path: Path) -> None:
    # 64 MiB of zeros compresses to ~64 KiB; the header says what it would become.
    src = archive(tmp_path / "bomb.tar.gz", [_file("zeros", bytes(64 * 1024 * 1024))], gz=True)
    assert src.stat().st_size < 1024 * 1024
    with pytest.raises(ModelArchiveUnsafe, match="more than"):
        unpack(src, tmp_path / "out", max_bytes=CAP)


def test_member_count_cap(tmp_path: Path) -> None:
    src = archive(tmp_path / "many.tar", [_file(f"f{i}", b"") for i in range(11)])
    with pytest.raises(ModelArchiveUnsafe, match="more than 10 members"):
        unpack(src, tmp_path / "out", max_bytes=CAP, max_members=10)
    unpack(src, tmp_path / "ok", max_bytes=CAP, max_members=11)


def test_oversized_pax_header_is_refused_before_it_is_read(tmp_path: Path) -> None:
    info, data = _file("a", b"x")
    info.pax_headers = {"comment": "c" * (MAX_META_BYTES + 10)}
    src = archive(tmp_path / "pax.tar", [(info, data)], format_=tarfile.PAX_FORMAT)
    with pytest.raises(ModelArchiveUnsafe, match="metadata header"):
        unpack(src, tmp_path / "out", max_bytes=CAP)


def test_pax_long_names_are_fine(tmp_path: Path) -> None:
    name = "/".join(["d" * 50] * 5) + "/file.bin"
    src = archive(tmp_path / "pax.tar", [_file(name, b"ok")], format_=tarfile.PAX_FORMAT)
    unpack(src, tmp_path / "out", max_bytes=CAP)
    assert (tmp_path / "out" / name).read_bytes() == b"ok"


@pytest.mark.parametrize(
    "content", [b"", b"not a tar archive at all" * 40, gzip.compress(b"not a tar" * 100)]
)
def test_unreadable_archives_are_refused(tmp_path: Path, content: bytes) -> None:
    src = tmp_path / "junk"
    src.write_bytes(content)
    with pytest.raises(ModelArchiveUnsafe, match="not a readable tar"):
        unpack(src, tmp_path / "out", max_bytes=CAP)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk"]


def test_truncated_gzip_is_refused(tmp_path: Path) -> None:
    whole = archive(tmp_path / "m.tar.gz", _model_members(), gz=True).read_bytes()
    src = tmp_path / "cut.tar.gz"
    src.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ModelArchiveUnsafe):
        unpack(src, tmp_path / "out", max_bytes=CAP)
    assert not (tmp_path / "out").exists()


def _dirs(levels: int, leaf: str | None = None) -> list[tuple[tarfile.TarInfo, bytes]]:
    """``levels`` nested directories ``d/d/…/``, and a file ``leaf`` in the deepest one."""
    members: list[tuple[tarfile.TarInfo, bytes]] = []
    for depth in range(1, levels + 1):
        info = tarfile.TarInfo("d/" * depth)
        info.type, info.mode = tarfile.DIRTYPE, 0o755
        members.append((info, b""))
    if leaf is not None:
        members.append(_file("d/" * levels + leaf, b"deep"))
    return members


def test_an_archive_1500_directories_deep_is_refused_by_its_depth(tmp_path: Path) -> None:
    """Attack: a 23 KB archive of 1,500 nested directories passed the checks, then the
    recursive walk and cleanup hit Python's recursion limit and left it in .staging."""
    src = archive(tmp_path / "deep.tar.gz", _dirs(1500, "x"), gz=True)
    assert src.stat().st_size < 64 * 1024
    with pytest.raises(ModelArchiveUnsafe, match=r"33 directory levels deep, over 32"):
        unpack(src, tmp_path / "out", max_bytes=CAP)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deep.tar.gz"]


@pytest.mark.parametrize(
    ("members", "ok"),
    [
        (_dirs(MAX_DEPTH, "model.bin"), True),  # 32 directories, a file in the last
        (_dirs(MAX_DEPTH + 1), False),  # a 33rd directory
        ([*_dirs(MAX_DEPTH)[:-1], _file("d/" * (MAX_DEPTH + 1) + "x", b"")], False),
    ],
    ids=["32-levels", "33-levels", "33-implicit"],
)
def test_directory_depth_is_capped_at_32_levels(
    tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes]], ok: bool
) -> None:
    """Attack: depth without a limit (see the 1,500-level archive): the cap is exact, and
    a file's implicit parent directories count as much as directory members."""
    src = archive(tmp_path / "m.tar", members)
    dest = tmp_path / "out"
    if ok:
        unpack(src, dest, max_bytes=CAP)
        assert (dest / ("d/" * MAX_DEPTH + "model.bin")).read_bytes() == b"deep"
        assert stat.S_IMODE((dest / ("d/" * MAX_DEPTH)).stat().st_mode) == 0o755
    else:
        with pytest.raises(ModelArchiveUnsafe, match="33 directory levels deep, over 32"):
            unpack(src, dest, max_bytes=CAP)
        assert not dest.exists()


def _path_of(total: int) -> str:
    """A member path of exactly ``total`` bytes: 16 directories of 250 bytes, then a file."""
    head = "/".join(c * 250 for c in "abcdefghijklmnop") + "/"
    return head + "f" * (total - len(head))


def test_paths_up_to_4096_bytes_unpack_and_longer_ones_are_refused(tmp_path: Path) -> None:
    """Attack: a member path longer than the kernel takes in one call (PATH_MAX): at 4,096
    bytes plus the cache's own prefix it used to fail as a storage error; one byte over
    the protocol's limit is refused as unsafe."""
    longest = _path_of(MAX_PATH_BYTES)
    src = archive(tmp_path / "ok.tar", [_file(longest, b"far")], format_=tarfile.PAX_FORMAT)
    unpack(src, tmp_path / "out", max_bytes=CAP)
    fd = os.open(tmp_path / "out", os.O_RDONLY)
    try:
        for part in longest.split("/")[:-1]:  # in steps: the whole path is over PATH_MAX
            fd, parent = os.open(part, os.O_RDONLY, dir_fd=fd), fd
            os.close(parent)
        assert os.stat(longest.rsplit("/", 1)[1], dir_fd=fd).st_size == 3
    finally:
        os.close(fd)

    over = _path_of(MAX_PATH_BYTES + 1)
    bad = archive(tmp_path / "bad.tar", [_file(over, b"far")], format_=tarfile.PAX_FORMAT)
    with pytest.raises(ModelArchiveUnsafe, match="path of 4097 bytes, over 4096"):
        unpack(bad, tmp_path / "refused", max_bytes=CAP)
    assert not (tmp_path / "refused").exists()
