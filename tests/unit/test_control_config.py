"""`control:` in the config, and `check-config`'s words about it."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config.host_warnings import host_warnings
from agent.config.loading import parse_config
from agent.control.peer import Peer, refusal
from agent.errors import ConfigError


def test_default_socket_is_in_the_units_runtime_directory() -> None:
    config = parse_config({})
    assert config.control.socket == Path("/run/cloudbender-agent/control.sock")
    assert config.control.group == "cloudbender-admin"


@pytest.mark.parametrize(
    ("socket", "words"),
    [
        ("control.sock", "must be an absolute path"),
        ("/" + "d" * 120 + "/c.sock", "longer than the 107 bytes"),
    ],
)
def test_a_socket_path_the_agent_cannot_bind_is_a_config_problem(socket: str, words: str) -> None:
    """Attack (operational): a relative path binds wherever the agent's working directory
    is, and one over 107 bytes cannot be bound at all: either way the operator finds no
    controls on the day of an incident. check-config must name control.socket."""
    with pytest.raises(ConfigError) as caught:
        parse_config({"control": {"socket": socket}})
    (problem,) = caught.value.problems
    assert problem.startswith("control.socket") and words in problem


def test_a_missing_group_is_a_warning_not_an_error() -> None:
    """A group not created yet leaves root able to use the socket: check-config warns
    (with the groupadd line) and still accepts the file."""
    config = parse_config({"control": {"group": "no-such-group-here"}})
    (line,) = [w for w in host_warnings(config, cpus=64) if w.startswith("control.group")]
    assert "does not exist" in line and "groupadd --system no-such-group-here" in line
    assert not [w for w in host_warnings(parse_config({}), cpus=64) if "control" in w]


def test_peer_rule() -> None:
    """Root always; a member by primary or supplementary group; nobody else, and
    nobody but root when the group does not exist."""
    assert refusal(Peer(1, 0, 0, frozenset()), None, "ops") is None
    assert refusal(Peer(1, 1000, 50, frozenset()), 50, "ops") is None
    assert refusal(Peer(1, 1000, 1000, frozenset({7, 50})), 50, "ops") is None
    assert "neither root nor a member of group 'ops'" in str(
        refusal(Peer(1, 1000, 1000, frozenset({7})), 50, "ops")
    )
    assert "does not exist" in str(refusal(Peer(1, 1000, 50, frozenset({50})), None, "ops"))
