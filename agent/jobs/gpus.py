"""GPU leases: which job holds which GPUs. Pure state, no I/O, no asyncio.

Jobs get whole GPUs, named by UUID (the runtime hands exactly those UUIDs to the
container; a MIG instance is a GPU of its own here, by its ``MIG-…`` UUID, and its
parent in MIG mode is never allocatable), all or nothing: a job asking for two GPUs
when one is free gets none and waits. Only GPUs that
:func:`agent.jobs.admission.leasable` accepts are ever leased: allocatable (offered
by ``gpus.allow`` and healthy, so never a ``lost`` or ``degraded`` GPU), of a type
the job accepts, with a UUID. The choice is deterministic: the free
matching GPUs with the lowest NVML indexes.

The inventory is passed in on every call rather than kept, because it changes (a GPU
is lost, a reload changes ``gpus.allow``) and the leases must not: a job keeps the
GPUs it holds until :meth:`GpuLeases.release`, even if one of them is lost meanwhile
(the runner notices through the container; the lease only stops a second job from
getting that GPU).

Not thread-safe: one owner (the job manager, on the event loop) calls it.
"""

from __future__ import annotations

from agent.gpu.base import GpuInfo, GpuInventory
from agent.jobs.admission import leasable


class GpuLeases:
    """The GPUs leased to each job, by job id."""

    def __init__(self) -> None:
        self._held: dict[str, tuple[str, ...]] = {}

    def _leased_uuids(self) -> set[str]:
        return {uuid for uuids in self._held.values() for uuid in uuids}

    def try_lease(
        self,
        job_id: str,
        count: int,
        types: tuple[str, ...] | None,
        inventory: GpuInventory | None,
    ) -> tuple[str, ...] | None:
        """Lease ``count`` free GPUs of ``types`` (``None`` or empty: any) to ``job_id``.

        Returns their UUIDs in index order; ``()`` when ``count`` is 0 (nothing is
        recorded); ``None`` when not enough matching GPUs are free now, in which case
        nothing is leased and the caller waits and tries again after a release or a
        new inventory. Admission has already checked that enough such GPUs exist at
        all, so ``None`` means "busy", not "never".

        Idempotent: a job that already holds a lease gets that lease back unchanged,
        whatever ``count``, ``types`` and ``inventory`` say now. Raises ``ValueError``
        for a negative ``count``.
        """
        if count < 0:
            raise ValueError(f"count must not be negative, not {count}")
        if job_id in self._held:
            return self._held[job_id]
        if count == 0:
            return ()
        candidates = [
            gpu.uuid
            for gpu in self.free(inventory)
            if gpu.uuid is not None and leasable(gpu, types)
        ]
        if len(candidates) < count:
            return None
        uuids = tuple(candidates[:count])
        self._held[job_id] = uuids
        return uuids

    def release(self, job_id: str) -> None:
        """Give back the GPUs of ``job_id``. Idempotent; an unknown job is a no-op."""
        self._held.pop(job_id, None)

    def restore(self, job_id: str, uuids: tuple[str, ...]) -> None:
        """Record that ``job_id`` holds ``uuids``, as read back from its container after
        an agent restart. Called before any new lease is made.

        The UUIDs need not be in the current inventory or allocatable (the GPU may
        have been lost or excluded since the job started): the container still has
        it, so no other job may get it. Restoring a job replaces its earlier lease;
        ``()`` removes it. Raises ``ValueError`` if a UUID is leased to another job:
        two containers must never share a GPU, and the caller must decide which keeps
        it.
        """
        others = {
            uuid: other for other, held in self._held.items() if other != job_id for uuid in held
        }
        for uuid in uuids:
            if uuid in others:
                raise ValueError(f"GPU {uuid} is already leased to job {others[uuid]}")
        if len(set(uuids)) != len(uuids):
            raise ValueError(f"job {job_id} lists a GPU twice")
        if uuids:
            self._held[job_id] = tuple(uuids)
        else:
            self._held.pop(job_id, None)

    def held(self) -> dict[str, tuple[str, ...]]:
        """Job id → leased UUIDs, for every job holding GPUs. A copy."""
        return dict(self._held)

    def free(self, inventory: GpuInventory | None) -> list[GpuInfo]:
        """Allocatable GPUs with a UUID that no job holds, lowest index first, of any
        type. Empty without an inventory."""
        if inventory is None:
            return []
        leased = self._leased_uuids()
        return sorted(
            (g for g in inventory.gpus if leasable(g, None) and g.uuid not in leased),
            # A MIG instance shares its parent's index; its slot orders it within.
            key=lambda g: (g.index, -1 if g.mig_index is None else g.mig_index),
        )
