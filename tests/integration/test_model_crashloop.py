"""A model archive that crashed the agent at every start: the real agent process.

Review issue 8, item 3: a 23 KB archive of 1,500 nested directories passed the unpack
checks; the recursive walk and cleanup hit Python's recursion limit and left the tree
in ``<state_dir>/models/.staging``, and the model cache's startup cleanup failed the
same way, so the agent exited 1 at every restart. Here the tree is left where the
attack left it, and a real ``cloudbender-agent run`` must start, build its job system
and connect to the reference control plane anyway.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.controlplane import ThreadedControlPlane
from agent.fsutil import remove_tree
from tests.helpers.env import seconds, valid_config, write_config
from tests.helpers.proc import running_agent

TOKEN = "s3cr3t-token-for-tests-0123456789"  # what valid_config writes
NODE = "crashloop-node"
LEVELS = 1_500


@pytest.fixture
def tidy(tmp_path: Path) -> Iterator[Path]:
    """``tmp_path``, emptied by remove_tree afterwards even if the test failed: pytest's
    own cleanup (shutil.rmtree) fails on a deep tree, in this run and later ones."""
    yield tmp_path
    for child in tmp_path.iterdir():
        remove_tree(child)


def leave_unpacked_tree(staging: Path, levels: int) -> Path:
    """What the crashed unpack left: ``build-…/.unpack-…/d/d/…``, ``levels`` deep."""
    top = staging / "build-crashed" / ".unpack-crashed"
    top.mkdir(parents=True)
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(levels):
            os.mkdir("d", 0o755, dir_fd=fd)
            fd, parent = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd), fd
            os.close(parent)
    finally:
        os.close(fd)
    return top.parent


def test_a_deep_tree_left_by_a_model_archive_does_not_stop_the_agent(tidy: Path) -> None:
    """Attack: the 1,500-level model archive's leftover in models/.staging made every
    start of the agent exit 1 (RecursionError in the model cache's startup cleanup)."""
    cp = ThreadedControlPlane(tokens={TOKEN: NODE}, heartbeat_s=1)
    cp.start()
    config = valid_config(tidy)
    config["node"]["id"] = NODE
    config["control_plane"]["url"] = cp.url
    config["control_plane"]["reconnect"] = {"initial_s": 0.2, "max_s": 1}
    state_dir = Path(config["state_dir"])
    staging = state_dir / "models" / ".staging"
    staging.mkdir(parents=True)
    for made in (state_dir, state_dir / "models", staging):
        made.chmod(0o700)
    left = leave_unpacked_tree(staging, LEVELS)
    port = int(config["health"]["listen"].rsplit(":", 1)[1])
    try:
        with running_agent(write_config(tidy, config), port, tidy) as agent:
            # The agent connects only once its job system (the model cache with it)
            # is built; a crash there ends the process instead. The leftover is then
            # deleted in a worker thread.
            deadline = time.monotonic() + seconds(30)
            while cp.node(NODE) is None or left.exists():
                code = agent.proc.poll()
                assert code is None, f"the agent exited with {code}:\n{agent.log()}"
                assert time.monotonic() < deadline, f"stuck:\n{agent.log()}"
                time.sleep(0.05)
            assert list(staging.iterdir()) == []
            code, health = agent.get_json("/healthz")
            assert (code, health) == (200, {"healthy": True, "problems": []}), health
            assert agent.proc.poll() is None
            assert "task_failed" not in agent.log()
            assert agent.stop()[0] == 0, agent.log()
    finally:
        cp.stop()
