"""Every place a peer-supplied name becomes a path, swept with hostile names.

A review assigned a job with id ``..`` and emptied the state directory (ledger, job
store, spool, models); ``.`` deleted every spooled result. Names from the control plane
(job ids, artifact names, datastore names) and from a job (result paths) are tried here
with ``..``, ``.``, absolute paths, NUL, very long and non-UTF-8 values at each place
that turns them into a path; a snapshot of the whole directory tree around the roots
shows that nothing outside the intended root was created, opened or removed.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path
from typing import Any

import pytest

from agent.config import parse_config
from agent.controlplane import manifest as cp_manifest
from agent.controlplane.resultfiles import JobFiles
from agent.jobs.admission import Rejected, admit
from agent.jobs.outputfs import OutputVolumes
from agent.link import Uplink
from agent.models.fetch import ArtifactFetcher
from agent.paths import UnsafeName, check_component, child
from agent.protocol import messages
from agent.results.spool import Spool
from tests.helpers.env import seconds, valid_config

HOSTILE = [
    "..",
    ".",
    "",
    "/",
    "/etc",
    "/etc/passwd",
    "a/../..",
    "../state",
    "a/b",
    "a\0b",
    "\0",
    "x" * 256,
    "é" * 128,  # 256 bytes of UTF-8
    "\udcff",  # not UTF-8: a lone surrogate, as json.loads gives for "\udcff"
    "ok\udc80",
]


def snapshot(root: Path) -> dict[str, tuple[int, int, int, int]]:
    """Every path below ``root`` with its mode, size, inode and mtime (no link followed)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            out[path] = (st.st_mode, st.st_size, st.st_ino, st.st_mtime_ns)
    return out


@pytest.fixture
def world(tmp_path: Path) -> Path:
    """A state directory with something in it, and a neighbour that must stay put."""
    state = tmp_path / "state"
    for sub in ("spool", "jobs", "models", "artifacts"):
        (state / sub).mkdir(parents=True)
    (state / "ledger.jsonl").write_text("{}\n")
    (state / "jobs.db").write_bytes(b"db")
    (state / "spool" / "j-1").mkdir()
    (state / "spool" / "j-1" / "manifest.json").write_text("{}")
    (tmp_path / "neighbour").write_text("keep")
    return tmp_path


@pytest.mark.parametrize("name", HOSTILE)
def test_child_refuses_every_name_that_is_not_one_component(name: str) -> None:
    with pytest.raises(UnsafeName) as caught:
        child(Path("/var/lib/agent/spool"), name)
    # The refusal never quotes the peer's name.
    if len(name) > 3:
        assert name not in str(caught.value)


@pytest.mark.parametrize("name", ["j-1", "J.2", "a" * 255, "job_3-x.y"])
def test_child_takes_plain_names(name: str) -> None:
    assert child(Path("/r"), name) == Path("/r") / name
    assert check_component(name) == name


@pytest.mark.parametrize("name", HOSTILE)
def test_spool_never_leaves_its_root(world: Path, name: str) -> None:
    before = snapshot(world)
    spool = Spool(world / "state" / "spool")
    output = world / "state" / "jobs"  # any directory: it must never be read
    for call in (
        lambda: spool.store(name, output, 10, 10),
        lambda: spool.load(name),
        lambda: spool.mark_delivered(name),
        lambda: spool.remove(name),
        lambda: spool.data_path(name),
        lambda: spool.legacy_file_path(name, 0),
    ):
        with pytest.raises(UnsafeName):
            call()
    assert snapshot(world) == before


@pytest.mark.parametrize("name", HOSTILE)
def test_job_outputs_never_leave_their_root(world: Path, name: str) -> None:
    before = snapshot(world)
    outputs = OutputVolumes(world / "state" / "jobs", "65534:65534")
    for call in (
        lambda: outputs.prepare(name),
        lambda: outputs.make(name, 1024, 1),
        lambda: outputs.ensure_mounted(name),
        lambda: outputs.usage(name),
        lambda: outputs.remove(name),
        lambda: outputs.mount_point(name),
    ):
        with pytest.raises(UnsafeName):
            call()
    assert snapshot(world) == before


@pytest.mark.parametrize("name", HOSTILE)
def test_a_hostile_job_id_never_reaches_the_job_system(name: str) -> None:
    """A job.assign with such an id is refused at the protocol layer (PROTOCOL.md 1.1: an
    id starts with a letter or digit) and answered ``error``/``bad_message``: no
    job.rejected, since the id cannot be correlated. (job.cancel and job.ack only look
    an id up among known jobs; they never make a path of it.)"""
    extra = {"image": {"ref": "img"}, "datastore": "vitals"}
    parsed = messages.parse_text(
        messages.encode_text({"type": "job.assign", "job_id": name, **extra})
    )
    assert isinstance(parsed, messages.Invalid), name
    assert parsed.job_id is None


@pytest.mark.parametrize("name", HOSTILE)
def test_artifact_names_never_become_paths(world: Path, name: str) -> None:
    """The fetcher names its files itself: a hostile artifact name only travels in
    ``artifact.get``; every file it creates is inside its own directory."""
    artifacts = world / "state" / "artifacts"
    before = {p: v for p, v in snapshot(world).items() if not p.startswith(str(artifacts))}

    async def main() -> list[dict[str, Any]]:
        sent: list[dict[str, Any]] = []

        class Link:
            async def send(self, message: dict[str, Any]) -> None:
                sent.append(message)

            async def send_frame(self, type_: str, frame: bytes | memoryview) -> None:
                raise AssertionError("no binary frames")

        uplink = Uplink()
        uplink.attach(Link())
        fetcher = ArtifactFetcher(uplink, artifacts)
        sha = hashlib.sha256(b"x").hexdigest()
        task = asyncio.create_task(fetcher.fetch(name, sha, 1, seconds(0.3)))
        with pytest.raises(Exception):  # noqa: B017 - any refusal; only the disk matters
            await task
        await fetcher.close()
        return sent

    sent = asyncio.run(main())
    assert all(s.get("artifact") == name for s in sent)
    after = {p: v for p, v in snapshot(world).items() if not p.startswith(str(artifacts))}
    assert after == before
    for path in snapshot(artifacts):
        assert os.path.dirname(path) == str(artifacts)


@pytest.mark.parametrize("name", HOSTILE)
def test_datastore_names_are_looked_up_never_joined(tmp_path: Path, name: str) -> None:
    config = parse_config(valid_config(tmp_path))
    assign = messages.JobAssign.model_construct(
        type="job.assign",
        job_id="j-1",
        image=messages.ImageSpec.model_construct(ref="img", digest=None, auth=None),
        datastore=name,
        model=None,
        command=None,
        env=None,
        gpus=None,
        resources=None,
        timeout_s=None,
        results=None,
    )
    decision = admit(assign, config, node_cpus=2, gpus=None, gpu_support=False)
    assert isinstance(decision, Rejected)
    assert decision.code in ("unknown_datastore", "bad_spec")
    assert str(tmp_path) not in decision.detail


@pytest.mark.parametrize(
    "path", [*(p for p in HOSTILE if p not in ("a/b",)), "a/./b", "a//b", "a/", "\\x"]
)
def test_the_reference_control_plane_never_writes_a_result_outside_its_root(
    world: Path, path: str
) -> None:
    """Result paths come from the job (through the agent); the reference control plane
    refuses every one that is not a plain relative path before anything is written."""
    message = {
        "type": "result.manifest",
        "job_id": "j-1",
        "total_bytes": 1,
        "files": [{"index": 0, "path": path, "size": 1, "sha256": "0" * 64}],
    }
    parsed = cp_manifest.parse(message)
    assert isinstance(parsed, str), path
    before = snapshot(world)
    for job_id in HOSTILE:
        files = JobFiles(world / "state" / "results", "node", job_id)
        for where in (files.final_dir, files.partial_dir, files.marker):
            assert str(where).startswith(str(world / "state" / "results") + "/")
            assert ".." not in where.parts
    assert snapshot(world) == before
