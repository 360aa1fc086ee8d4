"""Issue 12, the unit under a real systemd: log priorities the journal can filter on.

systemd connects the agent's stderr to journald, which records every line at priority
6 (info) unless the line starts with a ``<N>`` prefix. Errors were therefore invisible
to ``journalctl -p err -u cloudbender-agent``. The agent prefixes lines only when its
stderr is that journal stream (``$JOURNAL_STREAM`` = its device:inode), so that json
lines written anywhere else stay pure JSON.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.helpers.env import seconds, valid_config, write_config
from tests.helpers.proc import REPO, agent_command


def _run_until_error(tmp_path: Path, journal_stream: str | None) -> list[str]:
    """Run the agent with a job store that cannot open (an error line) and stop it."""
    config: dict[str, Any] = valid_config(tmp_path, control_plane=False)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the state directory's parent should be")
    config["state_dir"] = str(blocker / "state")
    config["logging"] = {"level": "info", "format": "json"}
    path = write_config(tmp_path, config)
    log_path = tmp_path / "stderr.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    env.pop("NOTIFY_SOCKET", None)
    env.pop("JOURNAL_STREAM", None)
    with log_path.open("wb") as log_file:
        if journal_stream == "this file":
            st = os.fstat(log_file.fileno())
            journal_stream = f"{st.st_dev}:{st.st_ino}"
        if journal_stream is not None:
            env["JOURNAL_STREAM"] = journal_stream
        cmd = [*agent_command(), "run", "--config", str(path)]
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + seconds(20)
        while not all(e in log_path.read_text() for e in ("job_store_unavailable", "started")):
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(seconds(0.05))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=seconds(10)) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=seconds(10))
    return log_path.read_text().splitlines()


def test_errors_reach_the_journal_as_errors(tmp_path: Path) -> None:
    """Attack (issue 12): an administrator runs `journalctl -p err -u cloudbender-agent`
    while the job store cannot open and sees nothing, because every line of the agent
    reached the journal at priority 6."""
    lines = _run_until_error(tmp_path, "this file")
    assert lines
    by_event: dict[str, str] = {}
    for line in lines:
        assert line[:1] == "<" and line[2:3] == ">", f"no priority prefix: {line!r}"
        event = json.loads(line[3:])  # after the prefix, the line is the JSON object
        by_event.setdefault(event["event"], line[:3])
    assert by_event["job_store_unavailable"] == "<3>"
    assert by_event["agent_started"] == "<6>"


def test_no_prefix_unless_stderr_is_the_journal(tmp_path: Path) -> None:
    """Attack (issue 12): a collector that parses json-mode lines as JSON meets `<6>{...`
    because the agent, started from a shell that inherited $JOURNAL_STREAM from a unit,
    wrote prefixes into a file that is not the journal."""
    st = os.stat(tmp_path)  # some other file's device:inode, as an inherited value is
    lines = _run_until_error(tmp_path, f"{st.st_dev}:{st.st_ino}")
    events = [json.loads(line)["event"] for line in lines]
    assert {"job_store_unavailable", "agent_started"} <= set(events)
