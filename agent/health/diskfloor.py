"""The disk-floor problem: the state directory has less free space than
``limits.min_free_mib``. Pure.

The job manager then refuses every new job ``no_space`` (agent.jobs.admission), so
the node, though connected, cannot do its work: ``/healthz`` answers 503 and names the
free space and the floor, which pages the operator who can free space or lower the
floor. A restart would not free a byte, so the watchdog keeps being fed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # facts imports this module: a runtime import would be a cycle
    from agent.health.facts import HostSample, Problem


def disk_floor_problem(host: HostSample | None, min_free_mib: int | None) -> Problem | None:
    """The problem when the last sample saw less free space than the floor; None when
    it did not, when no floor is given, or when free space is unknown."""
    from agent.health.facts import Problem

    if host is None or min_free_mib is None or host.state_dir_free_mib is None:
        return None
    free = host.state_dir_free_mib
    if free >= min_free_mib:
        return None
    return Problem(
        "state_dir_low_space",
        f"free space in the state directory is {free} MiB, under limits.min_free_mib "
        f"{min_free_mib} MiB: new jobs are refused no_space",
    )
