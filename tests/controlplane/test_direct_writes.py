"""The reference CP's result files written past the page cache (``O_DIRECT``).

Bulk chunks go to the disk directly, through aligned buffers and threads of their own;
what is not whole aligned blocks goes through the cache. These tests hold the CP to the
promises that must not change with it: the bytes on disk are the bytes received, in any
mix of chunk sizes and offsets; a file system that refuses direct writes still gets them;
a direct write that fails (a full disk) fails every durable point after it, so no ack
covers it; and a restart never takes bytes that were never written for bytes held.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from agent.controlplane.directwrites import DirectWrites
from agent.controlplane.manifest import Manifest, ResultFile
from agent.controlplane.resultfiles import JobFiles
from agent.controlplane.resultworker import ResultWorker
from agent.controlplane.upload import Upload
from tests.helpers.env import seconds

MIB = 1024 * 1024
KIB = 1024


def _manifest(*contents: bytes) -> Manifest:
    return Manifest(
        "j-1",
        tuple(
            ResultFile(i, f"out/f{i}.bin", len(data), hashlib.sha256(data).hexdigest())
            for i, data in enumerate(contents)
        ),
    )


@contextmanager
def _direct() -> Iterator[DirectWrites]:
    direct = DirectWrites()
    try:
        yield direct
    finally:
        direct.close()


@contextmanager
def _mounted(kind: str, target: Path, options: str = "") -> Iterator[Path]:
    """A fresh file system of ``kind`` at ``target`` (root only), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a file system needs root")
    target.mkdir()
    argv = ["mount", "-t", kind, *(["-o", options] if options else []), kind, str(target)]
    subprocess.run(argv, check=True, capture_output=True, timeout=seconds(20))
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=True, timeout=seconds(20))


def _publish_every_kind_of_piece(root: Path) -> None:
    """Receive three files into ``root`` with direct writes on offer and publish them:
    file 0 in every kind of piece (aligned whole MiB, aligned odd blocks, a small tail,
    then unaligned bulk), file 1 small, file 2 in one piece over a MiB and not whole
    blocks. The published files must be the bytes received."""
    first = MIB + 300 * KIB + 5000 + 600 * KIB + MIB
    data = [os.urandom(first), b"0123456789", os.urandom(2 * MIB + 7)]
    manifest = _manifest(*data)
    files = JobFiles(root, "node", "j-1")
    files.begin(manifest)
    with _direct() as direct:
        offset = 0
        for size in (MIB, 300 * KIB, 5000, 600 * KIB, MIB):
            files.write(0, offset, data[0][offset : offset + size], direct)
            offset += size
        files.complete(0)
        for index in (1, 2):
            files.write(index, 0, data[index], direct)
            files.complete(index)
        final = files.finish(manifest)
    for entry, expected in zip(manifest.files, data, strict=True):
        assert (final / entry.path).read_bytes() == expected


def test_bulk_bytes_land_byte_identical_in_any_mix_of_pieces(tmp_path: Path) -> None:
    _publish_every_kind_of_piece(tmp_path)


def test_a_file_system_that_refuses_direct_writes_gets_the_bytes_through_the_cache(
    tmp_path: Path,
) -> None:
    with _mounted("ramfs", tmp_path / "ramfs") as root:
        probe = root / "probe"
        probe.touch()
        with pytest.raises(OSError) as refused:  # what the fallback is for
            os.close(os.open(probe, os.O_WRONLY | os.O_DIRECT))
        assert refused.value.errno == errno.EINVAL
        _publish_every_kind_of_piece(root)


def test_a_direct_write_into_a_full_disk_fails_every_later_durable_point(
    tmp_path: Path,
) -> None:
    with _mounted("tmpfs", tmp_path / "small", "size=2m") as root:
        data = os.urandom(4 * MIB)
        manifest = _manifest(data)
        files = JobFiles(root, "node", "j-1")
        files.begin(manifest)
        with _direct() as direct:
            for offset in range(0, len(data), MIB):
                with contextlib.suppress(OSError):  # the first one is waited for, and fits
                    files.write(0, offset, data[offset : offset + MIB], direct)
            with pytest.raises(OSError) as first:
                files.start_durable()()
            assert first.value.errno == errno.ENOSPC
            with pytest.raises(OSError) as again:  # never "durable" after a lost write
                files.durable()
            assert again.value.errno == errno.ENOSPC
            # A new manifest starts afresh: the failure belonged to the bytes it forgets.
            small = _manifest(b"abc")
            files.begin(small)
            files.write(0, 0, b"abc", direct)
            files.complete(0)
            final = files.finish(small)
        assert (final / "out/f0.bin").read_bytes() == b"abc"


def test_a_restart_takes_no_bytes_after_a_hole_for_bytes_held(tmp_path: Path) -> None:
    """A partial file as long as the bytes received but with a gap never written (what
    a crash of the machine can leave): resuming after the gap would claim bytes the CP
    does not hold, and the file would fail its sha256 only at ``result.end``."""
    data = os.urandom(3 * MIB)
    manifest = _manifest(data)
    files = JobFiles(tmp_path, "node", "j-1")
    files.begin(manifest)
    files.write(0, 0, data[:MIB])
    files.durable()
    with open(files.tree / "out/f0.bin", "r+b") as handle:  # the later write, alone
        os.pwrite(handle.fileno(), data[2 * MIB :], 2 * MIB)
    files.close()

    again = JobFiles(tmp_path, "node", "j-1")
    assert again.held(manifest) == [MIB]
    again.write(0, MIB, data[MIB:])
    again.complete(0)
    final = again.finish(manifest)
    assert (final / "out/f0.bin").read_bytes() == data


def _open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_after_a_failed_direct_write_the_worker_still_closes_everything(tmp_path: Path) -> None:
    """Found by review: a failed direct write made every later close raise, so stopping
    the CP raised, left its writer threads running and the upload's descriptors open,
    and a durable point queued before the failure was known never closed what it took."""
    with _mounted("tmpfs", tmp_path / "small", "size=2m") as root:
        data = os.urandom(6 * MIB)
        manifest = _manifest(data)
        upload = Upload("node", "j-1", JobFiles(root, "node", "j-1"))
        before = _open_descriptors()

        async def main() -> None:
            worker = ResultWorker()
            await worker.run(upload.begin, manifest)
            points = []
            for offset in range(0, len(data), MIB):
                worker.store(upload, 0, offset, data[offset : offset + MIB], False)
                points.append(worker.durable(upload))  # several queued before any fails
            results = await asyncio.gather(*points, return_exceptions=True)
            assert any(isinstance(r, OSError) and r.errno == errno.ENOSPC for r in results)
            assert isinstance(results[-1], OSError)  # never durable after a lost write
            worker.close(lambda: upload.files.close())  # must not raise

        asyncio.run(main())
        assert not [t.name for t in threading.enumerate() if t.name.startswith("cp-results")]
        assert _open_descriptors() == before
