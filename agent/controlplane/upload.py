"""One job's upload of results (docs/protocol.md §5), its test faults, and its snapshot.

:class:`Upload` is the live record that :class:`~agent.controlplane.results.ResultStore`
keeps per ``(node_id, job_id)``: the manifest, the bytes held of each file (written,
durable, acknowledged), a running sha256 per file, and the counters that tests read
through :class:`ResultsState`.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.controlplane.manifest import Manifest
from agent.controlplane.resultacks import AckPlan
from agent.controlplane.resultfiles import JobFiles

if TYPE_CHECKING:
    from agent.controlplane.results import ResultContext


@dataclass
class ResultFault:
    """Test faults for one job's results (or every job's); see :meth:`ResultStore.set_fault`."""

    stop_acking: bool = False
    drop_after_bytes: int | None = None
    reject_file_once: int | None = None
    reject_always: int | None = None
    # Durable points wait (in the worker, before fdatasync) until this is set.
    hold_durable: threading.Event | None = None
    received: int = 0  # payload bytes received since armed, for drop_after_bytes
    durable_waiting: threading.Event = field(default_factory=threading.Event)  # one waited


@dataclass(frozen=True)
class ResultsState:
    """A snapshot of what one job's results did, across sessions. All zero if none came.

    ``wire_bytes``: payload bytes of every ``result.chunk`` received, stored or not.
    ``max_unacked``: the most payload bytes ever received in one attempt (manifest to
    session end) but not yet acknowledged, i.e. the agent's flow-control window in use.
    ``acks``: ``(file, offset)`` of every ``result.ack`` sent; ``withheld``: acks that
    ``stop_acking`` kept back. ``held``: bytes held of each file now. ``files``: the
    stored results, once accepted.
    """

    node_id: str
    job_id: str
    manifests: tuple[dict[str, Any], ...] = ()
    resumes: tuple[tuple[int, ...], ...] = ()
    chunks: int = 0
    wire_bytes: int = 0
    acks: tuple[tuple[int, int], ...] = ()
    withheld: int = 0
    max_unacked: int = 0
    ends: int = 0
    accepted: int = 0
    rejected: tuple[tuple[int, str], ...] = ()
    drops: int = 0
    held: tuple[int, ...] = ()
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        """Whether the results were accepted."""
        return self.accepted > 0


class Upload:
    """One job's results: the manifest, what is held, what was recorded."""

    def __init__(self, node_id: str, job_id: str, files: JobFiles) -> None:
        self.node_id, self.job_id, self.files = node_id, job_id, files
        self.manifest: Manifest | None = None
        self.ctx: ResultContext | None = None  # the session of the latest manifest
        self.final: Path | None = None  # where the accepted files are
        self.written: list[int] = []
        self.durable: list[int] = []
        self.digests: list[hashlib._Hash] = []
        self.sent = 0  # this attempt's payload bytes in
        self.manifests: list[dict[str, Any]] = []
        self.resumes: list[tuple[int, ...]] = []
        self.acks: list[tuple[int, int]] = []
        self.rejected: list[tuple[int, str]] = []
        self.chunks = self.wire_bytes = self.withheld = self.max_unacked = 0
        self.ends = self.accepted = self.drops = 0
        self.store_error: OSError | None = None  # the first failed write (resultworker)
        self.unsynced = 0  # payload bytes written since the last durable point
        self.plan: AckPlan | None = None  # the acks of the current attempt
        self.attempt = 0  # one per manifest answered with result.resume
        self.ack_lock = asyncio.Lock()  # acks leave in the order they were planned
        self.ack_tasks: set[asyncio.Task[None]] = set()

    def begin(self, manifest: Manifest) -> None:
        self.files.begin(manifest)
        self.store_error = None
        self.manifest = manifest
        n = len(manifest.files)
        self.written, self.durable = [0] * n, [0] * n
        self.digests = [hashlib.sha256() for _ in range(n)]

    def recover(self, manifest: Manifest) -> None:
        """Take up what a control plane on the same directory held before a restart."""
        final = self.files.accepted_files(manifest)
        held = None if final is not None else self.files.held(manifest)
        if final is not None or held is not None:
            self.manifest, self.final = manifest, final
            self.written = held or [0] * len(manifest.files)
            self.durable = list(self.written)
            self.digests = [self.files.digest_of(i, n) for i, n in enumerate(self.written)]

    def forget(self, index: int) -> None:
        self.files.discard(index)
        self.written[index] = self.durable[index] = 0
        self.digests[index] = hashlib.sha256()

    def first_bad(self) -> tuple[int, str] | None:
        assert self.manifest is not None
        for entry in self.manifest.files:
            if self.written[entry.index] != entry.size:
                return entry.index, "size_mismatch"
            if self.digests[entry.index].hexdigest() != entry.sha256:
                return entry.index, "checksum_mismatch"
        return None

    def _placed(self) -> dict[str, Path]:
        if self.final is None or self.manifest is None:
            return {}
        return {entry.path: self.final / entry.path for entry in self.manifest.files}

    def snapshot(self) -> ResultsState:
        return ResultsState(
            self.node_id,
            self.job_id,
            tuple(copy.deepcopy(self.manifests)),
            tuple(self.resumes),
            self.chunks,
            self.wire_bytes,
            tuple(self.acks),
            self.withheld,
            self.max_unacked,
            self.ends,
            self.accepted,
            tuple(self.rejected),
            self.drops,
            tuple(self.durable),
            self._placed(),
        )
