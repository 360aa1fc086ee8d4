"""Which ``result.ack`` to send for one upload attempt (docs/protocol.md §5). Pure.

Revision 1.1 makes acks cumulative across files: ``(file k, offset o)`` says that files
0…k-1 are stored whole and file k up to byte o. So one ack per durable point says all
there is to say, however many files it covers: 10,000 files of 1 KiB need a handful of
acks, not 10,000. :class:`AckPlan` sends that one ack, naming the *frontier*: the first
file not yet stored whole, or the last file at its size once all are.

Bytes of files past the frontier (stored while an earlier file is incomplete, which
only a rejected file's resend causes) are not covered by any ack until the frontier
passes them; the agent counts them as unacknowledged meanwhile, which is the truth.

The caller owns durability: it may pass to :meth:`AckPlan.advance` only offsets that
are durable, and must send the acks returned in the order returned.
"""

from __future__ import annotations

from collections.abc import Sequence


class AckPlan:
    """The acks of one attempt, from the ``result.resume`` offsets onwards.

    ``sizes``: each file's size in the manifest; ``start``: the offsets sent in
    ``result.resume`` (durable, and what the agent counts as acknowledged).
    ``acked_total``: payload bytes newly covered by the acks of this attempt, the
    agent's reading of them (for the CP's ``max_unacked``).
    """

    def __init__(self, sizes: Sequence[int], start: Sequence[int]) -> None:
        self._sizes = list(sizes)
        self._acked = list(start)  # what the acks sent (or the resume) cover, per file
        self._frontier = 0
        self._last: tuple[int, int] | None = None
        self.acked_total = 0
        if self._sizes:
            self.advance(start)  # the resume said it: no ack, nothing newly covered
            self.acked_total = 0

    def advance(self, durable: Sequence[int]) -> list[tuple[int, int]]:
        """The ``(file, offset)`` ack to send now that ``durable`` bytes of each file
        are stored durably (at most one); ``[]`` when it would cover nothing new."""
        n = len(self._sizes)
        if n == 0:
            return []
        k = self._frontier
        while k < n and durable[k] >= self._sizes[k]:
            self._cover(k, self._sizes[k])
            k += 1
        self._frontier = k
        if k < n:
            self._cover(k, durable[k])
            target = (k, durable[k])
        else:
            target = (n - 1, self._sizes[n - 1])
        if target == self._last:
            return []
        self._last = target
        return [target]

    def reject(self, index: int) -> None:
        """File ``index`` was rejected and forgotten: it comes again from 0, and acks
        start again from it (the agent forgets its credit for that file too)."""
        self._acked[index] = 0
        self._frontier = min(self._frontier, index)
        self._last = None

    def _cover(self, index: int, offset: int) -> None:
        gain = offset - self._acked[index]
        if gain > 0:
            self._acked[index] = offset
            self.acked_total += gain
