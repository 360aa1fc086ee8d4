"""Issue 12: the operator's rows of `status`, `status --watch`, the disk floor in
/healthz and the CLI's own lines in the journal."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

from agent.config import parse_config
from agent.errors import DaemonUnreachable
from agent.health.facts import HostSample, NodeFacts, assess
from agent.health.node_rows import node_rows, render_node_rows
from agent.health.status import status_document
from agent.journal_stderr import PriorityStream
from agent.runtime.base import RuntimeInfo
from agent.statuscmd import render_status
from agent.statuswatch import CLEAR, watch
from tests.helpers.env import valid_config

TOKEN = "s3cr3t-token-for-tests-0123456789"


def _doc(tmp_path: Path, facts: NodeFacts | None = None, **raw_changes: Any) -> dict[str, Any]:
    raw = valid_config(tmp_path)
    raw.update(raw_changes)
    facts = facts or NodeFacts()
    return status_document(facts, parse_config(raw), [])


def test_status_shows_a_token_fingerprint_the_provider_can_compare_never_the_token(
    tmp_path: Path,
) -> None:
    """Attack: a support call where the operator must prove which token the node holds;
    reading the token aloud (or pasting /status, readable off the node with
    health.allow_remote) would leak it. A short SHA-256 prefix is shown instead."""
    doc = _doc(tmp_path)
    expected = "sha256:" + hashlib.sha256(TOKEN.encode()).hexdigest()[:12]
    assert doc["token"] == {"fingerprint": expected, "error": None}
    text = render_status(doc)
    assert expected in text
    assert TOKEN not in text and TOKEN not in repr(doc)
    config = parse_config(valid_config(tmp_path))
    (tmp_path / "token").write_text("short\n")  # a token the next dial will refuse to send
    broken = status_document(NodeFacts(), config, [])["token"]
    assert broken["fingerprint"] is None and broken["error"]
    assert "unreadable" in render_status(status_document(NodeFacts(), config, []))


def test_status_rows_engine_slots_draining_and_pending_restart(tmp_path: Path) -> None:
    """Attack: an operator asks why a node takes no work; `status` did not say that
    the engine was down, that both slots were held, that the node was draining, or that
    a reloaded key still waits for a restart."""
    facts = NodeFacts()
    facts.runtime = RuntimeInfo("docker", None, False, False, "no answer on unix:///x.sock")
    facts.jobs = (
        {"job_id": "a", "state": "running", "created_at": 0.0},
        {"job_id": "b", "state": "succeeded", "created_at": 0.0},
    )
    facts.draining = True
    facts.pending_restart = ("node.id", "runtime.docker_host")
    doc = _doc(tmp_path, facts)
    assert doc["engine"]["up"] is False
    assert doc["slots"] == {"used": 1, "free": 1, "total": 2}
    assert doc["draining"] is True
    assert doc["pending_restart"] == ["node.id", "runtime.docker_host"]
    text = render_status(doc)
    assert "Engine         DOWN (no answer on unix:///x.sock)" in text
    assert "Job slots      1 used, 1 free (of 2)" in text
    assert "Draining       yes" in text
    assert "Restart needed yes, for node.id, runtime.docker_host" in text
    facts.runtime = RuntimeInfo("docker", "27.3.1", False, True, None)
    facts.draining, facts.pending_restart = False, ()
    lines = render_node_rows(node_rows(facts, parse_config(valid_config(tmp_path))))
    assert "Engine         up, docker 27.3.1" in lines
    assert "Draining       no" in lines and "Restart needed no" in lines


def test_healthz_names_the_disk_floor(tmp_path: Path) -> None:
    """Attack: the state directory fills up; every new job is refused no_space while
    /healthz stays 200, so nobody is paged for a node that cannot work."""
    facts = NodeFacts()
    facts.host = HostSample(4, None, None, 1000, 100, state_dir_free_mib=100)
    problems = assess(facts, max_disconnected_s=60, min_free_mib=2048)
    assert [p.code for p in problems] == ["state_dir_low_space"]
    assert "100 MiB, under limits.min_free_mib 2048 MiB" in problems[0].detail
    assert not problems[0].restart_helps  # a restart frees no space: the watchdog is fed
    assert assess(facts, max_disconnected_s=60, min_free_mib=100) == []


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_watch_refreshes_shows_a_vanished_daemon_and_ends_quietly_on_ctrl_c() -> None:
    """Attack: an operator watches a node through an agent restart; a watch that died
    with a traceback when the daemon went away (or on Ctrl-C) shows nothing when it
    matters."""
    answers: list[Any] = [{"n": 1}, DaemonUnreachable("no daemon answers on 127.0.0.1:1"), {"n": 3}]
    sleeps: list[float] = []

    def fetch() -> dict[str, Any]:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return dict(answer)

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if not answers:
            raise KeyboardInterrupt

    out = io.StringIO()
    watch(fetch, lambda d: f"round {d['n']}", 2.0, out, sleep=sleep)
    blocks = out.getvalue().split("\n\n")
    assert blocks[0] == "round 1"
    assert "no daemon answers on 127.0.0.1:1" in blocks[1] and "every 2 s" in blocks[1]
    assert blocks[2] == "round 3\n"
    assert sleeps == [2.0, 2.0, 2.0]
    tty = _Tty()
    watch(lambda: {"n": 7}, lambda d: f"round {d['n']}", 0.5, tty, sleep=lambda s: None, rounds=2)
    assert tty.getvalue().count(CLEAR) == 2 and "Every 0.5 s" in tty.getvalue()


def test_cli_lines_on_the_journal_carry_a_priority(tmp_path: Path) -> None:
    """Attack: `journalctl -p err` shows nothing of an exit-78 config error, since the
    CLI's own lines reached the journal at priority 6; log lines keep their prefix."""
    with (tmp_path / "err").open("w") as raw:
        stream = PriorityStream(raw)  # type: ignore[arg-type]
        print("/etc/x.yaml: 2 problems in the configuration:", file=stream)
        print("  limits.pids: must be at least 1", file=stream)
        print("warning: gpus.allow lists GPU 9", file=stream)
        stream.write('<6>{"event": "started"}\n')
        stream.write("partial ")
        stream.write("line\n")
        assert stream.fileno() == raw.fileno()
    assert (tmp_path / "err").read_text().splitlines() == [
        "<3>/etc/x.yaml: 2 problems in the configuration:",
        "<3>  limits.pids: must be at least 1",
        "<4>warning: gpus.allow lists GPU 9",
        '<6>{"event": "started"}',
        "<3>partial line",
    ]
