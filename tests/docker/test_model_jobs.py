"""Jobs with a model artifact (PROTOCOL.md §6) on the real engine."""

from __future__ import annotations

import hashlib
import io
import tarfile

import pytest

from tests.helpers.jobnode import JobNode

pytestmark = pytest.mark.docker


def archive(members: dict[str, bytes], *, symlink: tuple[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if symlink is not None:
            info = tarfile.TarInfo(symlink[0])
            info.type = tarfile.SYMTYPE
            info.linkname = symlink[1]
            tar.addfile(info)
    return buffer.getvalue()


def model_field(artifact: str, data: bytes) -> dict[str, object]:
    return {"artifact": artifact, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


READ_MODEL = (
    'cat /opt/model/weights.txt > /opt/output/seen.txt; echo "$MODEL_DIR" > /opt/output/dir.txt; '
    "(echo x > /opt/model/new.txt) 2>/opt/output/write-error.txt; true"
)


def test_model_is_delivered_mounted_read_only_and_fetched_once(node: JobNode) -> None:
    data = archive({"weights.txt": b"w=42\n"})
    node.cp.add_artifact("mdl-1", data)
    node.assign("j-m1", READ_MODEL, model=model_field("mdl-1", data))
    assert node.wait_end("j-m1", timeout=60)["state"] == "succeeded", node.agent.log()[-2000:]
    assert node.result("j-m1", "seen.txt") == b"w=42\n"
    assert node.result("j-m1", "dir.txt") == b"/opt/model\n"
    assert b"Read-only file system" in node.result("j-m1", "write-error.txt")

    node.assign("j-m2", READ_MODEL, model=model_field("mdl-1", data))
    assert node.wait_end("j-m2", timeout=60)["state"] == "succeeded"
    assert node.result("j-m2", "seen.txt") == b"w=42\n"
    state = node.cp.node(node.node_id)
    assert state is not None
    assert state.artifact_offsets("mdl-1") == [0]  # the second job used the cache


def test_wrong_sha256_fails_model_checksum_mismatch(node: JobNode) -> None:
    data = archive({"weights.txt": b"w=42\n"})
    node.cp.add_artifact("mdl-2", data)
    wrong = {"artifact": "mdl-2", "sha256": "0" * 64}
    node.assign("j-sum", READ_MODEL, model=wrong)
    end = node.wait_end("j-sum", timeout=60)
    assert (end["state"], end["reason"]) == ("failed", "model_checksum_mismatch")
    node.wait_gone("j-sum")


def test_unsafe_archive_fails_model_unavailable(node: JobNode) -> None:
    data = archive({"weights.txt": b"w\n"}, symlink=("passwd", "/etc/passwd"))
    node.cp.add_artifact("mdl-3", data)
    node.assign("j-unsafe", READ_MODEL, model=model_field("mdl-3", data))
    end = node.wait_end("j-unsafe", timeout=60)
    assert (end["state"], end["reason"]) == ("failed", "model_unavailable")
    node.wait_gone("j-unsafe")


def test_unknown_artifact_fails_model_unavailable(node: JobNode) -> None:
    node.assign("j-none", READ_MODEL, model={"artifact": "nope", "sha256": "a" * 64})
    end = node.wait_end("j-none", timeout=60)
    assert (end["state"], end["reason"]) == ("failed", "model_unavailable")
