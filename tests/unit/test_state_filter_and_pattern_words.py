"""`jobs --state` refuses a state that does not exist, and a key whose value must match
a pattern is explained in the project's words, never as the pattern itself."""

from __future__ import annotations

import pytest

from agent.cliparser import build_parser
from agent.config import parse_config
from agent.errors import ConfigError
from agent.jobs.model import State


def test_an_unknown_job_state_is_refused_with_the_list(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Attack (a typo at 3 a.m.): `jobs --state faild` answered "No jobs.", so the
    administrator concluded that no job had failed. It must be an error that lists
    the states."""
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["jobs", "--state", "faild"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'faild'" in err
    assert all(repr(state.value) in err for state in State), err
    assert build_parser().parse_args(["jobs", "--state", "failed"]).state == "failed"


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"node": {"id": "a b"}}, "node.id"),
        ({"runtime": {"job_user": "nobody"}}, "runtime.job_user"),
        ({"control": {"group": "9 admins"}}, "control.group"),
    ],
)
def test_a_value_that_does_not_match_is_explained_in_words(
    data: dict[str, object], key: str
) -> None:
    """Attack (an unreadable check-config): a bad control.group was reported as "must be
    a string matching ^[A-Za-z_][A-Za-z0-9_.-]{0,63}$", the validator's words, which
    an administrator has to decode before fixing anything."""
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    (line,) = [p for p in caught.value.problems if p.startswith(f"{key}:")]
    assert "matching" not in line and "^" not in line and "$" not in line, line
