"""ModelCache over a fake fetcher: reuse, holds, eviction, restarts, failures, leftovers."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import io
import os
import stat
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from agent.errors import (
    ModelArchiveUnsafe,
    ModelChecksumMismatch,
    ModelStorageError,
    ModelUnavailable,
)
from agent.fsutil import remove_tree
from agent.models.cache import ModelCache
from agent.models.layout import STAGING
from agent.protocol.messages import ModelSpec
from tests.helpers.env import seconds

KIB = 1024


def tar_of(files: dict[str, bytes]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return raw.getvalue()


def model(name: str, payload_kib: int = 1) -> tuple[ModelSpec, bytes]:
    # os.urandom: incompressible, so archive and unpacked sizes are alike.
    data = tar_of({"weights.bin": os.urandom(payload_kib * KIB), "name.txt": name.encode()})
    sha = hashlib.sha256(data).hexdigest()
    spec = {"artifact": name, "sha256": sha, "size": len(data)}
    return ModelSpec.model_validate(spec), data


class FakeFetcher:
    """Serves archives from memory into a spool, counting fetches; can be held or fail."""

    def __init__(self, spool: Path) -> None:
        self.spool = spool
        spool.mkdir()
        self.archives: dict[str, bytes] = {}
        self.fetches: list[str] = []
        self.gate: asyncio.Event | None = None
        self.error: Exception | None = None

    async def fetch(
        self,
        artifact: str,
        expected_sha256: str,
        expected_size: int | None,
        timeout_s: float,
        *,
        max_bytes: int | None = None,
    ) -> Path:
        self.fetches.append(artifact)
        if self.gate is not None:
            async with asyncio.timeout(timeout_s):
                await self.gate.wait()
        if self.error is not None:
            raise self.error
        path = self.spool / f"{artifact}-{len(self.fetches)}.tar"
        path.write_bytes(self.archives[artifact])
        return path


def run_cache(tmp_path: Path, max_mib: int, body, **kw) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        fetcher = FakeFetcher(tmp_path / "spool")
        cache = ModelCache(tmp_path / "models", max_mib, fetcher, **kw)
        await body(cache, fetcher)

    asyncio.run(main())


def test_first_acquire_builds_a_private_entry_and_the_second_reuses_it(tmp_path: Path) -> None:
    spec, data = model("mdl-1")

    async def body(cache: ModelCache, fetcher: FakeFetcher) -> None:
        fetcher.archives["mdl-1"] = data
        path = await cache.acquire("j-1", spec, seconds(5))
        assert path == tmp_path / "models" / spec.sha256 / "model"
        assert (path / "name.txt").read_bytes() == b"mdl-1"
        again = await cache.acquire("j-2", spec, seconds(5))
        assert again == path
        assert fetcher.fetches == ["mdl-1"]  # the second job did not fetch it again
        assert list(fetcher.spool.iterdir()) == []  # the archive is gone once unpacked
        assert cache.in_use() == {spec.sha256}

    run_cache(tmp_path, 10, body)
    root = tmp_path / "models"
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert stat.S_IMODE((root / spec.sha256).stat().st_mode) == 0o700
    assert stat.S_IMODE((root / spec.sha256 / "entry.json").stat().st_mode) == 0o600
    assert stat.S_IMODE((root / spec.sha256 / "model").stat().st_mode) == 0o755
    assert stat.S_IMODE((root / spec.sha256 / "model" / "name.txt").stat().st_mode) == 0o644


def test_concurrent_acquires_of_one_model_fetch_once(tmp_path: Path) -> None:
    spec, data = model("mdl-1")

    async def body(cache: ModelCache, fetcher: FakeFetcher) -> None:
        fetcher.archives["mdl-1"] = data
        fetcher.gate = asyncio.Event()
        jobs = [asyncio.create_task(cache.acquire(f"j-{i}", spec, seconds(5))) for i in range(3)]
        await asyncio.sleep(seconds(0.05))
        fetcher.gate.set()
        paths = await asyncio.gather(*jobs)
        assert len(set(paths)) == 1
        assert fetcher.fetches == ["mdl-1"]

    run_cache(tmp_path, 10, body)


def test_entries_survive_a_restart_and_leftovers_are_cleaned(tmp_path: Path) -> None:
    spec, data = model("mdl-1")

    async def first(cache: ModelCache, fetcher: FakeFetcher) -> None:
        fetcher.archives["mdl-1"] = data
        await cache.acquire("j-1", spec, seconds(5))

    run_cache(tmp_path, 10, first)
    root = tmp_path / "models"
    half = root / ("ab" * 32)  # named like an entry, no entry.json: a crash mid-build
    (half / "model").mkdir(parents=True)
    (root / STAGING / "build-x" / "model").mkdir(parents=True)
    (root / "not-ours").mkdir()

    async def second(cache: ModelCache, fetcher: FakeFetcher) -> None:
        assert set(cache.entries()) == {spec.sha256}
        assert cache.in_use() == set()
        await cache.acquire("j-2", spec, seconds(5))
        assert fetcher.fetches == []

    (tmp_path / "spool").rename(tmp_path / "spool-1")
    run_cache(tmp_path, 10, second)
    assert not half.exists()
    assert list((root / STAGING).iterdir()) == []
    assert (root / "not-ours").is_dir()


def test_unused_models_are_evicted_oldest_used_first(tmp_path: Path) -> None:
    a, b, c = model("a", 400), model("b", 400), model("c", 400)

    async def body(cache: ModelCache, fetcher: FakeFetcher) -> None:
        for spec, data in (a, b, c):
            fetcher.archives[spec.artifact] = data
        for job, (spec, _) in (("j-a", a), ("j-b", b)):
            await cache.acquire(job, spec, seconds(5))
            cache.release(job)
            await asyncio.sleep(0.01)  # distinct last-used times
        await cache.acquire("j-a2", a[0], seconds(5))  # a is now the most recently used
        cache.release("j-a2")
        assert set(cache.entries()) == {a[0].sha256, b[0].sha256}  # 800 KiB: under 1 MiB
        await cache.acquire("j-c", c[0], seconds(5))
        assert set(cache.entries()) == {a[0].sha256, c[0].sha256}
        await asyncio.sleep(seconds(0.2))  # removal runs in a thread
        assert not (cache.root / b[0].sha256).exists()
        assert fetcher.fetches == ["a", "b", "c"]

    run_cache(tmp_path, 1, body)


def test_models_in_use_are_never_evicted(tmp_path: Path) -> None:
    a, b = model("a", 700), model("b", 700)

    async def body(cache: ModelCache, fetcher: FakeFetcher) -> None:
        for spec, data in (a, b):
            fetcher.archives[spec.artifact] = data
        path_a = await cache.acquire("j-a", a[0], seconds(5))
        path_b = await cache.acquire("j-b", b[0], seconds(5))
        assert cache.total_bytes() > cache.max_bytes  # over the limit, but both in use
        assert path_a.is_dir() and path_b.is_dir()
        cache.release("j-a")
        assert set(cache.entries()) == {b[0].sha256}
        cache.release("j-b")
        assert set(cache.entries()) == {b[0].sha256}  # alone, it fits

    run_cache(tmp_path, 1, body)


def test_a_reserved_model_is_kept_for_a_queued_job(tmp_path: Path) -> None:
    a, b = model("a", 700), model("b", 700)

    async def body(cache: ModelCache, fetcher: FakeFetcher) -> None:
        for spec, data in (a, b):
            fetcher.archives[spec.artifact] = data
        await cache.acquire("j-a", a[0], seconds(5))
        cache.reserve("j-queued", a[0].sha256)
        cache.release("j-a")
        await cache.acquire("j-b", b[0], seconds(5))
        assert set(cache.entries()) == {a[0].sha256, b[0].sha256}
        cache.release("j-queued")
        assert set(cache.entries()) == {b[0].sha256}

    run_cache(tmp_path, 1, body)


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (ModelChecksumMismatch("bad bytes"), ModelChecksumMismatch),
        (ModelUnavailable("no such artifact"), ModelUnavailable),
    ],
)
def test_fetch_failures_leave_nothing_held(tmp_path: Path, error: Exception, kind: type) -> None:
    spec, _ = model("a")

    async def body(cache: ModelCache, fetcher: FakeFetcher) -> None:
        fetcher.error = error
        with pytest.raises(kind):
            await cache.acquire("j-1", spec, seconds(5))
        assert cache.in_use() == set()
        assert cache.entries() == {}

    run_cache(tmp_path, 10, body)


def test_an_unsafe_archive_is_not_cached(tmp_path: Path) -> None:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        link = tarfile.TarInfo("evil")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/shadow"
        tar.addfile(link)
    data = raw.getvalue()
    spec = ModelSpec.model_validate(
        {"artifact": "evil", "sha256": hashlib.sha256(data).hexdigest()}
    )

    async def body(cache: ModelCache, fetcher: FakeFetcher) -> None:
        fetcher.archives["evil"] = data
        with pytest.raises(ModelArchiveUnsafe, match="symbolic link"):
            await cache.acquire("j-1", spec, seconds(5))
        assert cache.entries() == {}
        assert list(fetcher.spool.iterdir()) == []
        assert list((cache.root / STAGING).iterdir()) == []
        assert not (cache.root / spec.sha256).exists()

    run_cache(tmp_path, 10, body)


def test_a_model_over_the_cap_is_refused(tmp_path: Path) -> None:
    spec, data = model("big", 300)

    async def body(cache: ModelCache, fetcher: FakeFetcher) -> None:
        fetcher.archives["big"] = data
        with pytest.raises(ModelArchiveUnsafe, match="more than"):
            await cache.acquire("j-1", spec, seconds(5))

    run_cache(tmp_path, 10, body, max_model_bytes=200 * KIB)


def test_waiting_behind_a_slow_fetch_times_out(tmp_path: Path) -> None:
    spec, data = model("a")

    async def body(cache: ModelCache, fetcher: FakeFetcher) -> None:
        fetcher.archives["a"] = data
        fetcher.gate = asyncio.Event()
        slow = asyncio.create_task(cache.acquire("j-1", spec, seconds(5)))
        await asyncio.sleep(seconds(0.05))
        with pytest.raises(ModelUnavailable, match="not ready in time"):
            await cache.acquire("j-2", spec, seconds(0.1))
        assert cache.in_use() == {spec.sha256}  # j-1 still holds it
        fetcher.gate.set()
        await slow
        cache.release("j-1")
        cache.release("j-1")  # idempotent
        assert cache.in_use() == set()

    run_cache(tmp_path, 10, body)


def test_storage_errors_say_which_failure_reason_applies() -> None:
    assert ModelStorageError("disk full", errno.ENOSPC).reason == "no_space"
    assert ModelStorageError("quota", errno.EDQUOT).reason == "no_space"
    assert ModelStorageError("denied", errno.EACCES).reason == "agent_error"
    assert ModelArchiveUnsafe("x").reason == "model_unavailable"
    assert ModelChecksumMismatch("x").reason == "model_checksum_mismatch"


def deep_tree(parent: Path, name: str, levels: int) -> None:
    """``parent/name/d/d/…`` ``levels`` deep, a file every 1,000 levels.

    Made relative to a descriptor: the whole path is far over PATH_MAX.
    """
    os.mkdir(parent / name)
    fd = os.open(parent / name, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for level in range(levels):
            os.mkdir("d", dir_fd=fd)
            if level % 1000 == 0:
                os.close(os.open("weights", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
            fd, parent_fd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd), fd
            os.close(parent_fd)
    finally:
        os.close(fd)


@pytest.fixture
def tidy(tmp_path: Path) -> Iterator[Path]:
    """A fresh directory, emptied afterwards by remove_tree even if the test failed:
    pytest's own cleanup (shutil.rmtree) fails on a deep tree, in this run and later ones.

    On a memory file system when there is one: making 100,000 nested directories takes
    well under a second there, and up to a minute on a busy disk.
    """
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        path = Path(tempfile.mkdtemp(prefix="test-model-cache-", dir=shm))
    else:
        path = tmp_path / "tidy"
        path.mkdir()
    try:
        yield path
    finally:
        remove_tree(path)


def test_a_100000_level_tree_left_in_staging_does_not_stop_the_cache(tidy: Path) -> None:
    """Attack: a deep model archive left in .staging by a crashed unpack made every start
    of the cache raise RecursionError (the agent exited 1, again at each restart)."""
    root = tidy / "models"
    (root / STAGING).mkdir(parents=True)
    deep_tree(root / STAGING, "build-x", 100_000)
    half = "cd" * 32  # named like an entry, a deep tree and no entry.json
    deep_tree(root, half, 1_500)
    spec, data = model("mdl-1")

    async def body(cache: ModelCache, fetcher: FakeFetcher) -> None:
        assert cache.entries() == {}
        fetcher.archives["mdl-1"] = data
        path = await cache.acquire("j-1", spec, seconds(5))
        assert (path / "name.txt").read_bytes() == b"mdl-1"

    run_cache(tidy, 10, body)
    assert list((root / STAGING).iterdir()) == []
    assert sorted(p.name for p in root.iterdir()) == sorted([STAGING, spec.sha256])


def test_a_1500_level_archive_fails_the_job_and_leaves_nothing(tidy: Path) -> None:
    """Attack: the 23 KB archive of 1,500 nested directories; it must fail as an unsafe
    archive (model_unavailable), not RecursionError, and leave no tree in .staging."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as tar:
        for depth in range(1, 1501):
            info = tarfile.TarInfo("d/" * depth)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
    data = raw.getvalue()
    spec = ModelSpec.model_validate(
        {"artifact": "deep", "sha256": hashlib.sha256(data).hexdigest()}
    )

    async def body(cache: ModelCache, fetcher: FakeFetcher) -> None:
        fetcher.archives["deep"] = data
        with pytest.raises(ModelArchiveUnsafe, match="directory levels deep, over 32") as info:
            await cache.acquire("j-1", spec, seconds(5))
        assert info.value.reason == "model_unavailable"
        assert list((cache.root / STAGING).iterdir()) == []

    run_cache(tidy, 10, body)


def _immutable(path: Path, on: bool) -> bool:
    flag = "+i" if on else "-i"
    try:
        done = subprocess.run(["chattr", flag, str(path)], capture_output=True, check=False)
    except OSError:
        return False
    return done.returncode == 0


def test_staging_that_cannot_be_emptied_is_logged_and_the_cache_starts(tidy: Path) -> None:
    """Attack: anything that makes the startup cleanup fail (here a file that cannot be
    deleted) used to stop the agent at every start; now it is logged and left."""
    stuck = tidy / "models" / STAGING / "build-x" / "stuck"
    stuck.parent.mkdir(parents=True)
    stuck.write_bytes(b"x")
    if not _immutable(stuck, True):
        pytest.skip("cannot make a file undeletable here (chattr +i needs CAP_LINUX_IMMUTABLE)")
    spec, data = model("mdl-1")

    async def body(cache: ModelCache, fetcher: FakeFetcher) -> None:
        fetcher.archives["mdl-1"] = data
        await cache.acquire("j-1", spec, seconds(5))

    try:
        with capture_logs() as logs:
            run_cache(tidy, 10, body)
        assert stuck.exists()
    finally:
        _immutable(stuck, False)
    warnings = [e for e in logs if e["event"] == "model_staging_cleanup_failed"]
    assert warnings and warnings[0]["log_level"] == "warning"
    assert (tidy / "models" / spec.sha256 / "model" / "name.txt").read_bytes() == b"mdl-1"
