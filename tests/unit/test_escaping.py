"""One rule for peer- and job-supplied strings on a terminal: escape what is not printable."""

from __future__ import annotations

import pytest

from agent.escaping import escape
from agent.statuscmd import render_jobs, render_status


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("plain name-1.csv", "plain name-1.csv"),
        ("résumé.txt", "résumé.txt"),
        ("\x1b[2K", "\\x1b[2K"),
        ("a\nb\tc\rd", "a\\nb\\tc\\rd"),
        ("\x7f\x9b", "\\x7f\\x9b"),
        ("\u202egnp.exe", "\\u202egnp.exe"),
        ("\U000e0041", "\\U000e0041"),  # a tag character: invisible
        ("\udcff", "\\udcff"),  # an undecodable byte, as os.fsdecode keeps it
        ("back\\x1b", "back\\\\x1b"),  # a literal backslash cannot pose as an escape
    ],
)
def test_escape_shows_every_non_printable_character(raw: str, shown: str) -> None:
    assert escape(raw) == shown
    assert escape(raw).isprintable()


def test_escape_can_keep_newlines_for_a_traceback() -> None:
    assert escape("line 1\nline\x1b 2", keep="\n") == "line 1\nline\\x1b 2"


def test_jobs_and_status_tables_escape_peer_strings() -> None:
    """Attack: a control plane assigns job id `j ESC[1A ESC[2K` with an image ref and a
    failure reason of the same kind; `cloudbender-agent jobs`/`status` printed them raw,
    rewriting the lines above on the operator's terminal."""
    csi = "\x1b[1A\x1b[2K"
    jobs = [
        {
            "job_id": f"j{csi}",
            "state": "failed",
            "reason": f"agent_error{csi}",
            "age_s": 3,
            "gpus": [],
            "image": f"busybox{csi}\u202e",
        }
    ]
    table = render_jobs(jobs)
    assert "\x1b" not in table and "\u202e" not in table
    assert "j\\x1b[1A\\x1b[2K" in table.splitlines()[1]
    status = render_status(
        {
            "node_id": f"n{csi}",
            "healthy": False,
            "problems": [{"detail": f"control plane said {csi}bye"}],
            "control_plane": {"state": "backoff", "url": "wss://cp", "last_error": f"x{csi}"},
            "datastores": [{"name": "vitals", "description": f"d{csi}"}],
            "jobs": jobs,
        }
    )
    assert "\x1b" not in status and "\u202e" not in status
    assert "\\\\x1b" not in status  # escaped once, not twice
