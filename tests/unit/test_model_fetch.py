"""ArtifactFetcher fed by hand: a real Uplink over a recording link, no socket.

The live path (the reference CP over a real WebSocket) is in
tests/integration/test_model_fetch.py; here every hostile or unlucky ordering of
frames is produced exactly.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from agent.errors import ModelChecksumMismatch, ModelUnavailable
from agent.link import Uplink
from agent.models.download import MAX_SHORT_ENDS
from agent.models.fetch import ArtifactFetcher
from agent.protocol import messages
from agent.protocol.session import PeerError
from tests.helpers.env import seconds

DATA = bytes(range(256)) * 40  # 10240 bytes
SHA = hashlib.sha256(DATA).hexdigest()
ART = "mdl-9"


class RecordingLink:
    """A session link that records what is sent on it."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self._changed = asyncio.Event()

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)
        self._changed.set()

    async def send_frame(self, type_: str, frame: bytes | memoryview) -> None:
        raise AssertionError("the fetcher sends no binary frames")

    async def gets(self, count: int) -> list[dict[str, Any]]:
        """Wait until ``count`` artifact.get were sent; all of them."""
        async with asyncio.timeout(seconds(2)):
            while len(self.sent) < count:
                self._changed.clear()
                await self._changed.wait()
        assert all(g["type"] == "artifact.get" for g in self.sent)
        return self.sent


def chunk(offset: int, payload: bytes, artifact: str = ART) -> messages.ArtifactChunk:
    header = {"type": "artifact.chunk", "artifact": artifact, "offset": offset}
    return messages.ArtifactChunk(messages.ArtifactChunkHeader.model_validate(header), payload)


def end(size: int = len(DATA), sha256: str = SHA, artifact: str = ART) -> messages.ArtifactEnd:
    message = {"type": "artifact.end", "artifact": artifact, "size": size, "sha256": sha256}
    return messages.ArtifactEnd.model_validate(message)


def feed(fetcher: ArtifactFetcher, data: bytes = DATA, start: int = 0, step: int = 4096) -> None:
    for offset in range(start, len(data), step):
        fetcher.on_chunk(chunk(offset, data[offset : offset + step]))


def listing(path: Path) -> list[str]:
    return sorted(os.listdir(path))


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


Scenario = Callable[[ArtifactFetcher, Uplink, RecordingLink, Path], Awaitable[None]]


def run(tmp_path: Path, scenario: Scenario, *, connected: bool = True) -> None:
    async def main() -> None:
        uplink, link = Uplink(), RecordingLink()
        if connected:
            uplink.attach(link)
        fetcher = ArtifactFetcher(uplink, tmp_path / "spool")
        try:
            await scenario(fetcher, uplink, link, tmp_path / "spool")
        finally:
            await fetcher.close()

    asyncio.run(main())


def start(fetcher: ArtifactFetcher, size: int | None = len(DATA), **kw: Any) -> asyncio.Task[Path]:
    timeout = kw.pop("timeout", seconds(5))
    return asyncio.create_task(fetcher.fetch(kw.pop("artifact", ART), SHA, size, timeout, **kw))


def test_delivered_verified_and_private(tmp_path: Path) -> None:
    async def scenario(f: ArtifactFetcher, _u: Uplink, link: RecordingLink, spool: Path) -> None:
        task = start(f)
        assert await link.gets(1) == [{"type": "artifact.get", "artifact": ART, "offset": 0}]
        feed(f)
        f.on_end(end())
        path = await task
        assert path.read_bytes() == DATA
        assert path.parent == spool
        assert mode_of(spool) == 0o700
        assert mode_of(path) == 0o600
        path.unlink()
        assert listing(spool) == []  # the caller's file was the last one
        assert f.in_flight() == []

    run(tmp_path, scenario)


def test_duplicates_and_gaps_are_dropped_and_a_short_end_asks_again(tmp_path: Path) -> None:
    async def scenario(f: ArtifactFetcher, _u: Uplink, link: RecordingLink, _s: Path) -> None:
        task = start(f)
        await link.gets(1)
        f.on_chunk(chunk(0, DATA[:4096]))
        f.on_chunk(chunk(0, b"X" * 4096))  # duplicate: dropped, not appended
        f.on_chunk(chunk(8192, DATA[8192:]))  # gap: dropped
        f.on_end(end())  # says 10240, 4096 held: ask again from 4096
        gets = await link.gets(2)
        assert gets[1]["offset"] == 4096
        feed(f, start=4096)
        f.on_end(end())
        assert (await task).read_bytes() == DATA

    run(tmp_path, scenario)


def test_ends_that_keep_coming_short_are_a_mismatch(tmp_path: Path) -> None:
    async def scenario(f: ArtifactFetcher, _u: Uplink, link: RecordingLink, spool: Path) -> None:
        task = start(f)
        await link.gets(1)
        f.on_chunk(chunk(0, DATA[:100]))
        for n in range(MAX_SHORT_ENDS):
            f.on_end(end())
            await link.gets(2 + n)
        f.on_end(end())
        with pytest.raises(ModelChecksumMismatch, match="ending short"):
            await task
        assert listing(spool) == []

    run(tmp_path, scenario)


@pytest.mark.parametrize(
    ("data", "the_end", "size", "match"),
    [
        (DATA, end(sha256="0" * 64), len(DATA), "names another sha256"),
        (DATA, end(size=len(DATA) + 1), len(DATA), "says 10241 bytes"),
        (DATA, end(size=len(DATA)), None, None),  # control: no size in the assignment
        (DATA[:-1] + b"!", end(), len(DATA), "do not match its sha256"),
        (DATA, end(size=100), None, "more bytes sent"),
    ],
    ids=["end-sha", "end-size", "ok", "bytes", "end-below-held"],
)
def test_end_and_bytes_are_checked_against_the_assignment(
    tmp_path: Path, data: bytes, the_end: messages.ArtifactEnd, size: int | None, match: str | None
) -> None:
    async def scenario(f: ArtifactFetcher, _u: Uplink, link: RecordingLink, spool: Path) -> None:
        task = start(f, size=size)
        await link.gets(1)
        feed(f, data)
        f.on_end(the_end)
        if match is None:
            assert (await task).read_bytes() == DATA
            return
        with pytest.raises(ModelChecksumMismatch, match=match) as info:
            await task
        assert info.value.reason == "model_checksum_mismatch"
        assert listing(spool) == []  # the partial file is gone

    run(tmp_path, scenario)


def test_a_chunk_past_the_expected_size_fails_at_once(tmp_path: Path) -> None:
    async def scenario(f: ArtifactFetcher, _u: Uplink, link: RecordingLink, spool: Path) -> None:
        task = start(f, size=5000)
        await link.gets(1)
        f.on_chunk(chunk(0, DATA[:4096]))
        f.on_chunk(chunk(4096, DATA[4096:8192]))
        with pytest.raises(ModelChecksumMismatch, match="exceeds 5000 bytes"):
            await task
        assert listing(spool) == []

    run(tmp_path, scenario)


def test_without_a_size_the_cap_applies(tmp_path: Path) -> None:
    async def scenario(f: ArtifactFetcher, _u: Uplink, link: RecordingLink, _s: Path) -> None:
        with pytest.raises(ModelUnavailable, match="larger than the cache"):
            await f.fetch(ART, SHA, 10_000, seconds(1), max_bytes=9_999)
        task = start(f, size=None, max_bytes=5000)
        await link.gets(1)
        feed(f)
        with pytest.raises(ModelUnavailable, match="exceeds the cache size"):
            await task

    run(tmp_path, scenario)


def test_unknown_artifact_error(tmp_path: Path) -> None:
    async def scenario(f: ArtifactFetcher, _u: Uplink, link: RecordingLink, _s: Path) -> None:
        task = start(f)
        await link.gets(1)
        assert not f.on_error(PeerError("unknown_artifact", "other", "artifact.get"))
        assert not f.on_error(PeerError("bad_message", ART, "artifact.get"))
        error = messages.ErrorMessage.model_validate(
            {"type": "error", "code": "unknown_artifact", "detail": ART}
        )
        assert f.on_error(error)
        with pytest.raises(ModelUnavailable, match="has no artifact") as info:
            await task
        assert info.value.reason == "model_unavailable"
        assert not f.on_error(error)  # no longer in flight

    run(tmp_path, scenario)


def test_frames_for_artifacts_not_in_flight_are_dropped(tmp_path: Path) -> None:
    async def scenario(f: ArtifactFetcher, _u: Uplink, link: RecordingLink, spool: Path) -> None:
        f.on_chunk(chunk(0, b"unasked", artifact="nobody-asked"))
        f.on_end(end(artifact="nobody-asked"))
        task = start(f)
        await link.gets(1)
        f.on_chunk(chunk(0, b"x" * 10, artifact="other"))
        feed(f)
        f.on_end(end())
        assert (await task).read_bytes() == DATA
        assert [Path(n).suffix for n in listing(spool)] == [".tar"]

    run(tmp_path, scenario)


def test_resume_after_the_session_drops(tmp_path: Path) -> None:
    async def scenario(f: ArtifactFetcher, uplink: Uplink, link: RecordingLink, _s: Path) -> None:
        task = start(f)
        await link.gets(1)
        f.on_chunk(chunk(0, DATA[:4096]))
        uplink.detach()
        await asyncio.sleep(seconds(0.05))
        second = RecordingLink()
        uplink.attach(second)
        f.on_session()
        assert await second.gets(1) == [{"type": "artifact.get", "artifact": ART, "offset": 4096}]
        feed(f, start=4096)
        f.on_end(end())
        assert (await task).read_bytes() == DATA
        assert len(link.sent) == 1

    run(tmp_path, scenario)


def test_a_new_session_is_noticed_without_on_session(tmp_path: Path) -> None:
    async def scenario(f: ArtifactFetcher, uplink: Uplink, _l: RecordingLink, _s: Path) -> None:
        task = start(f)
        await asyncio.sleep(seconds(0.05))  # waiting for a session
        link = RecordingLink()
        uplink.attach(link)
        assert (await link.gets(1))[0]["offset"] == 0
        feed(f)
        f.on_end(end())
        await task

    run(tmp_path, scenario, connected=False)


def test_timeout_is_unavailable_and_leaves_nothing(tmp_path: Path) -> None:
    async def scenario(f: ArtifactFetcher, _u: Uplink, _l: RecordingLink, spool: Path) -> None:
        with pytest.raises(ModelUnavailable, match="not delivered within"):
            await f.fetch(ART, SHA, len(DATA), seconds(0.1))
        await asyncio.sleep(0)  # the download task finishes its cleanup
        assert f.in_flight() == []
        assert listing(spool) == []

    run(tmp_path, scenario, connected=False)


def test_same_artifact_is_fetched_once_for_concurrent_callers(tmp_path: Path) -> None:
    async def scenario(f: ArtifactFetcher, _u: Uplink, link: RecordingLink, spool: Path) -> None:
        first, second = start(f), start(f)
        await link.gets(1)
        feed(f)
        f.on_end(end())
        a, b = await first, await second
        assert a != b
        assert a.read_bytes() == b.read_bytes() == DATA
        assert len(link.sent) == 1
        a.unlink()
        b.unlink()
        assert listing(spool) == []

    run(tmp_path, scenario)


def test_one_caller_leaving_does_not_stop_the_others(tmp_path: Path) -> None:
    async def scenario(f: ArtifactFetcher, _u: Uplink, link: RecordingLink, _s: Path) -> None:
        first, second = start(f), start(f)
        await link.gets(1)
        first.cancel()
        feed(f)
        f.on_end(end())
        assert (await second).read_bytes() == DATA
        assert first.cancelled()

    run(tmp_path, scenario)


def test_the_last_caller_leaving_stops_the_download(tmp_path: Path) -> None:
    async def scenario(f: ArtifactFetcher, _u: Uplink, link: RecordingLink, spool: Path) -> None:
        task = start(f)
        await link.gets(1)
        f.on_chunk(chunk(0, DATA[:4096]))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0)
        assert f.in_flight() == []
        assert listing(spool) == []
        f.on_chunk(chunk(4096, DATA[4096:8192]))  # late frames are dropped

    run(tmp_path, scenario)


def test_other_expectations_wait_for_the_download_in_flight(tmp_path: Path) -> None:
    async def scenario(f: ArtifactFetcher, _u: Uplink, link: RecordingLink, _s: Path) -> None:
        first = start(f, size=None)
        await link.gets(1)
        second = start(f)  # same artifact, with a size: its own download, afterwards
        await asyncio.sleep(seconds(0.05))
        assert len(link.sent) == 1
        feed(f)
        f.on_end(end())
        await first
        assert (await link.gets(2))[1]["offset"] == 0
        feed(f)
        f.on_end(end())
        assert (await second).read_bytes() == DATA

    run(tmp_path, scenario)


def test_different_artifacts_download_side_by_side(tmp_path: Path) -> None:
    other = b"another model" * 500
    other_sha = hashlib.sha256(other).hexdigest()

    async def scenario(f: ArtifactFetcher, _u: Uplink, link: RecordingLink, _s: Path) -> None:
        a = start(f)
        b = asyncio.create_task(f.fetch("mdl-2", other_sha, len(other), seconds(5)))
        gets = await link.gets(2)
        assert {g["artifact"] for g in gets} == {ART, "mdl-2"}
        for offset in range(0, max(len(DATA), len(other)), 1000):  # interleaved
            f.on_chunk(chunk(offset, DATA[offset : offset + 1000]))
            f.on_chunk(chunk(offset, other[offset : offset + 1000], artifact="mdl-2"))
        f.on_end(end(len(other), other_sha, artifact="mdl-2"))
        f.on_end(end())
        assert (await a).read_bytes() == DATA
        assert (await b).read_bytes() == other

    run(tmp_path, scenario)


def test_close_fails_what_is_in_flight(tmp_path: Path) -> None:
    async def scenario(f: ArtifactFetcher, _u: Uplink, link: RecordingLink, _s: Path) -> None:
        task = start(f)
        await link.gets(1)
        await f.close()
        with pytest.raises(ModelUnavailable, match="shutting down"):
            await task

    run(tmp_path, scenario)


def test_leftovers_of_a_crash_are_removed_at_start(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o755)
    (spool / "artifact-7.part").write_bytes(b"half")
    (spool / "artifact-8.tar").write_bytes(b"whole")
    ArtifactFetcher(Uplink(), spool)
    assert listing(spool) == []
    assert stat.S_IMODE(os.stat(spool).st_mode) == 0o700


def test_a_malformed_expected_sha256_is_a_caller_bug(tmp_path: Path) -> None:
    async def scenario(f: ArtifactFetcher, _u: Uplink, _l: RecordingLink, _s: Path) -> None:
        with pytest.raises(ValueError, match="64 lowercase hex"):
            await f.fetch(ART, "../../etc", None, seconds(1))

    run(tmp_path, scenario)
