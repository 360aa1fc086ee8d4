"""Model artifacts end to end: the real reference CP, a real WebSocket session on
loopback (agent.connection), the fetcher and the cache. No job manager: a small
handler does the routing the job manager does (chunks, ends and errors to the
fetcher; the uplink attached after each welcome and detached when the session ends).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import tarfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.config import parse_config
from agent.connection import Connection
from agent.controlplane import ControlPlane
from agent.errors import ModelChecksumMismatch, ModelUnavailable
from agent.health.facts import ControlPlaneFacts
from agent.link import Link, Uplink
from agent.models.cache import ModelCache
from agent.models.fetch import ArtifactFetcher
from agent.protocol import messages
from agent.protocol.session import PeerError, Stats
from tests.controlplane.wire import hello
from tests.helpers.env import seconds, valid_config

TOKEN = "s3cr3t-token-for-tests-0123456789"  # what valid_config writes
NODE = "test-node"
KIB = 1024


class ArtifactRouting:
    """The session handler's artifact part, as the job manager will do it."""

    def __init__(self, uplink: Uplink, fetcher: ArtifactFetcher) -> None:
        self.uplink, self.fetcher = uplink, fetcher

    def hello_jobs(self) -> list[dict[str, str]]:
        return []

    async def on_established(self, link: Link) -> None:
        self.uplink.attach(link)
        self.fetcher.on_session()

    async def on_message(self, link: Link, message: messages.Incoming) -> None:
        if isinstance(message, messages.ArtifactChunk):
            self.fetcher.on_chunk(message)
        elif isinstance(message, messages.ArtifactEnd):
            self.fetcher.on_end(message)

    async def on_invalid_assignment(self, link: Link, job_id: str, detail: str) -> None:
        return None

    async def on_peer_error(self, link: Link, error: PeerError) -> None:
        self.fetcher.on_error(error)

    def on_closed(self) -> None:
        self.uplink.detach()


@dataclass
class Node:
    cp: ControlPlane
    fetcher: ArtifactFetcher
    cache: ModelCache
    uplink: Uplink

    def offsets(self, artifact: str) -> list[int]:
        node = self.cp.node(NODE)
        return [] if node is None else node.artifact_offsets(artifact)


def tar_gz(files: dict[str, bytes]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return raw.getvalue()


def spec(artifact: str, data: bytes, **changes: object) -> messages.ModelSpec:
    fields: dict[str, object] = {
        "artifact": artifact,
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
    }
    return messages.ModelSpec.model_validate(fields | changes)


@asynccontextmanager
async def node(tmp_path: Path, max_mib: int = 64) -> AsyncIterator[Node]:
    raw = valid_config(tmp_path)
    async with ControlPlane({TOKEN: NODE}) as cp:
        raw["control_plane"]["url"] = cp.url
        raw["control_plane"]["reconnect"] = {"initial_s": 0.05, "max_s": 0.2}
        config = parse_config(raw).control_plane
        assert config is not None
        uplink = Uplink()
        fetcher = ArtifactFetcher(uplink, tmp_path / "models" / ".spool")
        cache = ModelCache(tmp_path / "models", max_mib, fetcher)
        telemetry: dict[str, Any] = {"gpus": [], "cpu_pct": None, "memory_used_mib": None}
        telemetry |= {"state_dir_free_mib": None, "jobs": []}

        def publish(_facts: ControlPlaneFacts) -> None:
            return None

        connection = Connection(
            config,
            hello=lambda jobs: hello(NODE),
            telemetry=lambda jobs: telemetry,
            handler=ArtifactRouting(uplink, fetcher),
            publish=publish,
            stats=Stats(),
            user_agent="test",
        )
        task = asyncio.create_task(connection.run())
        try:
            async with asyncio.timeout(seconds(5)):
                await uplink.wait_connected()
            yield Node(cp, fetcher, cache, uplink)
            assert cp.node(NODE) is not None and cp.node(NODE).violations == []  # type: ignore[union-attr]
        finally:
            await fetcher.close()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def test_delivered_verified_unpacked_and_reused(tmp_path: Path) -> None:
    data = tar_gz({"predict.py": b"print('ok')\n", "weights.bin": os.urandom(3 * 1024 * KIB)})

    async def main() -> None:
        async with node(tmp_path) as n:
            await n.cp.add_artifact("mdl-9", data)  # 1 MiB chunks: 4 frames
            model_dir = await n.cache.acquire("j-1", spec("mdl-9", data), seconds(10))
            assert (model_dir / "predict.py").read_bytes() == b"print('ok')\n"
            assert n.offsets("mdl-9") == [0]
            n.cache.release("j-1")
            again = await n.cache.acquire("j-2", spec("mdl-9", data), seconds(10))
            assert again == model_dir
            assert n.offsets("mdl-9") == [0]  # the second job did not fetch it again
            assert list(n.fetcher.spool_dir.iterdir()) == []

    asyncio.run(main())


def test_resume_after_the_cp_drops_the_connection_mid_artifact(tmp_path: Path) -> None:
    weights = os.urandom(700 * KIB)
    data = tar_gz({"weights.bin": weights})

    async def main() -> None:
        async with node(tmp_path) as n:
            await n.cp.add_artifact("mdl-9", data, chunk_bytes=64 * KIB)
            await n.cp.artifact_fault("mdl-9", drop_after_bytes=200_000)
            generation = n.uplink.generation
            model_dir = await n.cache.acquire("j-1", spec("mdl-9", data), seconds(10))
            assert n.offsets("mdl-9") == [0, 200_000]
            assert n.uplink.generation > generation  # it did reconnect
            assert (model_dir / "weights.bin").read_bytes() == weights
            sessions = {r.session for r in n.cp.node(NODE).artifact_requests}  # type: ignore[union-attr]
            assert len(sessions) == 2

    asyncio.run(main())


@pytest.mark.parametrize("wrong", ["assignment_sha256", "end_sha256", "end_size", "model_size"])
def test_wrong_checksums_or_sizes_are_refused(tmp_path: Path, wrong: str) -> None:
    data = tar_gz({"a": b"model bytes"})

    async def main() -> None:
        async with node(tmp_path) as n:
            await n.cp.add_artifact("mdl-9", data)
            model = spec("mdl-9", data)
            if wrong == "assignment_sha256":
                model = spec("mdl-9", data, sha256="0" * 64)
            elif wrong == "end_sha256":
                await n.cp.artifact_fault("mdl-9", end_sha256="1" * 64)
            elif wrong == "end_size":
                await n.cp.artifact_fault("mdl-9", end_size=len(data) + 1)
            else:
                model = spec("mdl-9", data, size=len(data) + 5)
            with pytest.raises(ModelChecksumMismatch) as info:
                await n.cache.acquire("j-1", model, seconds(10))
            assert info.value.reason == "model_checksum_mismatch"
            assert n.cache.entries() == {} and n.cache.in_use() == set()
            assert list(n.fetcher.spool_dir.iterdir()) == []

    asyncio.run(main())


def test_unknown_artifact_is_unavailable(tmp_path: Path) -> None:
    async def main() -> None:
        async with node(tmp_path) as n:
            with pytest.raises(ModelUnavailable, match="has no artifact") as info:
                await n.cache.acquire("j-1", spec("nope", b"x"), seconds(10))
            assert info.value.reason == "model_unavailable"
            assert n.offsets("nope") == [0]

    asyncio.run(main())


def test_eviction_over_the_limit_spares_models_in_use(tmp_path: Path) -> None:
    blobs = {name: tar_gz({"w": os.urandom(600 * KIB)}) for name in ("a", "b", "c")}

    async def main() -> None:
        async with node(tmp_path, max_mib=1) as n:
            models = {}
            for name, data in blobs.items():
                await n.cp.add_artifact(name, data)
                models[name] = spec(name, data)
            a_dir = await n.cache.acquire("j-a", models["a"], seconds(10))
            b_dir = await n.cache.acquire("j-b", models["b"], seconds(10))
            assert a_dir.is_dir() and b_dir.is_dir()  # 1.2 MiB, over 1 MiB, both in use
            n.cache.release("j-a")
            assert set(n.cache.entries()) == {models["b"].sha256}  # a: unused, evicted
            await asyncio.sleep(seconds(0.2))
            assert not a_dir.exists()
            n.cache.release("j-b")
            await n.cache.acquire("j-c", models["c"], seconds(10))
            assert set(n.cache.entries()) == {models["c"].sha256}
            await n.cache.acquire("j-a2", models["a"], seconds(10))  # fetched again
            assert n.offsets("a") == [0, 0]
            assert n.offsets("b") == n.offsets("c") == [0]

    asyncio.run(main())


def test_concurrent_fetches_same_and_different_artifacts(tmp_path: Path) -> None:
    one = tar_gz({"w": os.urandom(300 * KIB)})
    two = tar_gz({"w": os.urandom(300 * KIB)})

    async def main() -> None:
        async with node(tmp_path) as n:
            await n.cp.add_artifact("one", one, chunk_bytes=32 * KIB)
            await n.cp.add_artifact("two", two, chunk_bytes=32 * KIB)
            acquires = [
                n.cache.acquire("j-1", spec("one", one), seconds(10)),
                n.cache.acquire("j-2", spec("one", one), seconds(10)),
                n.cache.acquire("j-3", spec("two", two), seconds(10)),
            ]
            dirs = await asyncio.gather(*acquires)
            assert dirs[0] == dirs[1] != dirs[2]
            assert n.offsets("one") == n.offsets("two") == [0]

    asyncio.run(main())
