"""Counts of ended jobs since the agent started, for ``/metrics``.

The job manager writes (on the event loop) and the health server's thread reads, so
every access takes the lock, and :meth:`JobTally.snapshot` hands back immutable copies:
a scrape never sees a job counted as ended without its duration. Counts start at zero
with every start of the agent, as Prometheus counters do; the job store, not this
tally, is the record that survives a restart.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable
from dataclasses import dataclass

# Job durations run from a second (a job that fails at once) to a day (the longest
# ``timeout_s`` a deployment is likely to allow); the last bucket is +Inf.
DURATION_BUCKETS_S: tuple[float, ...] = (
    1,
    5,
    15,
    30,
    60,
    120,
    300,
    600,
    1800,
    3600,
    7200,
    21600,
    86400,
)


@dataclass(frozen=True)
class Durations:
    """A histogram of durations: ``counts[i]`` jobs took at most ``DURATION_BUCKETS_S[i]``
    (not cumulative; the last entry counts those above every bound)."""

    counts: tuple[int, ...]
    total_s: float

    def cumulative(self) -> list[tuple[str, float]]:
        """``(le, count)`` pairs in Prometheus' form, ending with ``+Inf``."""
        out: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*DURATION_BUCKETS_S, float("inf")), self.counts, strict=True):
            running += count
            out.append(("+Inf" if bound == float("inf") else f"{bound:g}", running))
        return out


EMPTY = Durations(counts=(0,) * (len(DURATION_BUCKETS_S) + 1), total_s=0.0)


@dataclass(frozen=True)
class TallySnapshot:
    # Ended jobs by (state, reason); reason "" where a job ended without one.
    ended: dict[tuple[str, str], int]
    # Durations by terminal state, from acceptance to end.
    durations: dict[str, Durations]
    result_bytes_sent: int


class JobTally:
    """Ended jobs by state and reason, their durations, and the result bytes sent.

    ``bytes_sent`` is read at each snapshot: the uplink's count of result payload
    bytes handed to the socket (resends included), so a long upload shows while it runs.
    """

    def __init__(self, bytes_sent: Callable[[], int] = lambda: 0) -> None:
        self._bytes_sent = bytes_sent
        self._lock = threading.Lock()
        self._ended: dict[tuple[str, str], int] = {}
        self._durations: dict[str, Durations] = {}

    def job_ended(self, state: str, reason: str | None, duration_s: float) -> None:
        """Count one job that ended in ``state`` after ``duration_s`` seconds."""
        duration_s = max(duration_s, 0.0)  # a clock stepped back must not go negative
        with self._lock:
            key = (state, reason or "")
            self._ended[key] = self._ended.get(key, 0) + 1
            old = self._durations.get(state, EMPTY)
            counts = list(old.counts)
            counts[bisect.bisect_left(DURATION_BUCKETS_S, duration_s)] += 1
            self._durations[state] = Durations(tuple(counts), old.total_s + duration_s)

    def snapshot(self) -> TallySnapshot:
        with self._lock:
            ended, durations = dict(self._ended), dict(self._durations)
        return TallySnapshot(ended, durations, self._bytes_sent())
