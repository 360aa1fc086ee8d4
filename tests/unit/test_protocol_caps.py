"""PROTOCOL.md 1.1's rules on ``job.assign``: id pattern, minimum CPUs, size caps, image refs.

Each cap is tried at its limit (accepted) and one past it (``job.rejected`` /
``bad_spec`` through :class:`InvalidAssignment`, whose detail names the field and the
limit and never quotes the value). The attacks: a hostile control plane growing the
agent's memory and job store with huge assignments (review item 6), a CPU limit that
rounds to "no limit" (item 4), job ids that are path components (``.``, ``..``), and an
image ref that carries terminal escapes into logs and ``/status`` (item 7).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from agent.protocol import messages
from agent.protocol.imageref import is_image_ref
from agent.protocol.session import Answered, InvalidAssignment, Received, Session

KIB = 1024
REF = "registry.example/provider/sepsis:1.4"


def established() -> Session:
    session = Session({"type": "hello", "protocol": 1, "node_id": "n1"})
    session.initiate()
    session.receive_text(json.dumps({"type": "welcome", "session": "s-1", "heartbeat_s": 15}))
    session.data_to_send()
    return session


def assign(**fields: Any) -> dict[str, Any]:
    message = {"type": "job.assign", "job_id": "j-1", "image": {"ref": REF}, "datastore": "vitals"}
    return message | fields


def receive(message: dict[str, Any] | str) -> Any:
    text = message if isinstance(message, str) else json.dumps(message)
    (event,) = established().receive_text(text)
    return event


def refused(message: dict[str, Any] | str, *words: str) -> InvalidAssignment:
    event = receive(message)
    assert isinstance(event, InvalidAssignment), event
    assert event.job_id == "j-1"
    for word in words:
        assert word in event.detail, event.detail
    return event


def accepted(message: dict[str, Any] | str) -> messages.JobAssign:
    event = receive(message)
    assert isinstance(event, Received), event
    assert isinstance(event.message, messages.JobAssign)
    return event.message


def env_of(total: int, entries: int = 1) -> dict[str, str]:
    """``entries`` variables whose names and values hold ``total`` bytes in all."""
    names = [f"V{i:03d}" for i in range(entries)]
    room = total - sum(len(n) for n in names)
    values = [room // entries + (1 if i < room % entries else 0) for i in range(entries)]
    return {n: "x" * v for n, v in zip(names, values, strict=True)}


# -- review item 6: size caps ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("at_limit", "over", "words"),
    [
        ({"command": ["a"] * 256}, {"command": ["a"] * 257}, ["command", "256"]),
        (
            {"command": ["x" * (32 * KIB), "é" * (16 * KIB)]},  # é is 2 bytes: bytes count
            {"command": ["x" * (32 * KIB), "é" * (16 * KIB), "y"]},
            ["command", str(64 * KIB), "bytes"],
        ),
        ({"env": env_of(300, 256)}, {"env": env_of(300, 257)}, ["env", "256"]),
        ({"env": env_of(64 * KIB)}, {"env": env_of(64 * KIB + 1)}, ["env", str(64 * KIB)]),
        ({"env": {"_A1" + "b" * 125: "v"}}, {"env": {"_A1" + "b" * 126: "v"}}, ["env", "names"]),
        (
            {"gpus": {"count": 1, "types": ["T"] * 16}},
            {"gpus": {"count": 1, "types": ["T"] * 17}},
            ["gpus.types", "16"],
        ),
        (
            {"gpus": {"count": 1, "types": ["G" * 256]}},
            {"gpus": {"count": 1, "types": ["G" * 257]}},
            ["gpus.types.0", "256"],
        ),
    ],
    ids=["command-items", "command-bytes", "env-entries", "env-bytes", "env-name", "types", "type"],
)
def test_each_cap_is_accepted_at_its_limit_and_refused_one_past_it(
    at_limit: dict[str, Any], over: dict[str, Any], words: list[str]
) -> None:
    """A control plane that sends ever larger fields to grow the agent's memory and store."""
    accepted(assign(**at_limit))
    event = refused(assign(**over), *words)
    assert "xxxxxxxx" not in event.detail and "GGGGGGGG" not in event.detail  # never echoed


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"BAD-NAME": "v"}, "names must match"),
        ({"1ST": "v"}, "names must match"),
        ({"A.B": "v"}, "names must match"),
        ({"OK": "v\u0000w"}, "NUL"),
    ],
)
def test_env_names_and_values_follow_1_1(env: dict[str, str], words: str) -> None:
    """Names Docker or a shell would read differently, and NUL bytes that cut a value."""
    event = refused(assign(env=env), "env", words)
    assert "BAD-NAME" not in event.detail and "1ST" not in event.detail


def _padded(target: int, job_id: str = "j-1", char: str = "p") -> str:
    """A job.assign text frame of exactly ``target`` bytes, padded in an unknown field."""
    base = json.dumps(assign(job_id=job_id, pad=""), separators=(",", ":"), ensure_ascii=False)
    room = target - len(base.encode())
    width = len(char.encode())
    text = json.dumps(
        assign(job_id=job_id, pad=char * (room // width) + "q" * (room % width)),
        separators=(",", ":"),
        ensure_ascii=False,
    )
    assert len(text.encode()) == target
    return text


@pytest.mark.parametrize("char", ["p", "€"])  # € is 3 bytes: the cap is in bytes
def test_a_job_assign_frame_is_at_most_256_kib(char: str) -> None:
    """Huge assignments of unknown fields, which the agent would parse, hold and log."""
    message = accepted(_padded(256 * KIB, char=char))
    assert message.job_id == "j-1"
    refused(_padded(256 * KIB + 1, char=char), "frame", str(256 * KIB))


def test_an_oversized_assign_without_a_usable_id_is_bad_message() -> None:
    """The id of a refused frame is the parsed top-level field: one in a nested object or
    a string does not count, so an oversized frame cannot be pinned on another job."""
    text = _padded(300 * KIB, job_id="../x")
    session = established()
    (event,) = session.receive_text(text)
    assert isinstance(event, Answered) and event.code == "bad_message"
    assert "frame" in event.detail
    nested = assign(image={"ref": REF, "job_id": "j-2"}, pad="p" * (300 * KIB))
    del nested["job_id"]
    (event,) = session.receive_text(json.dumps(nested))
    assert isinstance(event, Answered) and event.code == "bad_message"


# -- review item 4: a CPU limit that means none ---------------------------------------------


@pytest.mark.parametrize("cpus", [1e-10, 0.009, 0])
def test_cpus_below_the_minimum_are_refused(cpus: float) -> None:
    """``resources.cpus: 1e-10`` became NanoCpus 0, which Docker reads as no limit."""
    refused(assign(resources={"cpus": cpus}), "resources.cpus", "0.01")


def test_cpus_at_the_minimum_are_accepted() -> None:
    resources = accepted(assign(resources={"cpus": 0.01})).resources
    assert resources is not None and resources.cpus == 0.01


# -- job ids that are path components -------------------------------------------------------


@pytest.mark.parametrize("job_id", [".", "..", "-x", "_x", ".hidden", "a" * 129, "a/b", ""])
def test_job_ids_outside_the_1_1_pattern_are_bad_message(job_id: str) -> None:
    """``.`` and ``..`` as job ids, which become paths on the node; ``-x`` an option."""
    session = established()
    (event,) = session.receive_text(json.dumps(assign(job_id=job_id)))
    assert isinstance(event, Answered) and event.code == "bad_message"
    (reply,) = [json.loads(f) for f in session.data_to_send() if isinstance(f, str)]
    assert (reply["type"], reply["code"], reply["ref"]) == ("error", "bad_message", "job.assign")


@pytest.mark.parametrize("job_id", ["a", "9", "A" * 128, "j.1_x-2", "a.."])
def test_job_ids_inside_the_pattern_are_accepted(job_id: str) -> None:
    assert accepted(assign(job_id=job_id)).job_id == job_id


def test_jobs_accepted_under_1_0_can_still_be_acked_and_cancelled() -> None:
    """After an upgrade a job ``_x`` from 1.0 must not be stuck in hello.jobs forever."""
    for kind in ("job.ack", "job.cancel"):
        event = receive({"type": kind, "job_id": "_x"})
        assert isinstance(event, Received) and event.message.job_id == "_x"  # type: ignore[union-attr]


# -- review item 7: image.ref is a reference ------------------------------------------------

DIGEST = "sha256:" + "0f" * 32


@pytest.mark.parametrize(
    "ref",
    [
        "busybox",
        REF,
        "127.0.0.1:5000/x:1",
        "localhost:5000/a/b",
        "[::1]:5000/a:latest",
        f"reg.example/p/m:2@{DIGEST}",
        f"reg.example/p/m@{DIGEST}",
        "a__b/c--d/e.f_g:T_1.x-y",
        "Reg.Example:443/path",
    ],
)
def test_image_references_are_accepted(ref: str) -> None:
    assert is_image_ref(ref)
    assert accepted(assign(image={"ref": ref})).image.ref == ref


@pytest.mark.parametrize(
    "ref",
    [
        "busybox\x1b]0;owned\x07",
        "busybox\n2026 job_accepted forged",
        "busy\u202ebox",
        "reg.example/Upper/x",
        "a:b:c",
        "x:-tag",
        "x@sha256:1234",
        "https://reg.example/x",
        "a___b",
        "x/",
        "a" * 256,
        "x:" + "t" * 129,
    ],
)
def test_what_is_not_an_image_reference_is_refused_without_being_quoted(ref: str) -> None:
    """An image.ref that would carry escapes, newlines or bidi overrides into the logs."""
    assert not is_image_ref(ref)
    event = refused(assign(image={"ref": ref}), "image.ref", "image reference")
    assert ref not in event.detail and "owned" not in event.detail
