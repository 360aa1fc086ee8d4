"""The node's model cache: verified, unpacked model artifacts by sha256 (docs/protocol.md §6).

Layout, all under ``root`` (``0700``: root only)::

    <root>/<sha256>/            0700   one entry; present only once complete
    <root>/<sha256>/entry.json  0600   {"sha256", "bytes"}; its mtime is "last used"
    <root>/<sha256>/model/      0755   the unpacked tree (files 0644): mounted read-only
                                       at /opt/model, the only way the job user reaches it
    <root>/.staging/            0700   unpacking and removal in progress; emptied at start

An entry is built in ``.staging`` and renamed into place only after its archive was
verified, unpacked and ``entry.json`` written, so a crash never leaves a half entry
that looks valid; at start, anything under ``root`` named like an entry but not
complete is removed. Names that are neither entries nor dot-names are left alone.

Removing what is left over never stops the agent: a tree that cannot be removed
(however deep, whatever went wrong) is logged and left in ``.staging`` for the next
start, since a model cache that refuses to start would put the node in a restart loop
that one hostile archive could cause. Leftovers are deleted in worker threads when
the cache is made on a running event loop, so a large one does not stall it. Only a
``root`` or ``.staging`` that cannot be made or listed is an error
(:class:`~agent.errors.ModelStorageError`).

Eviction: an entry is removed when no job holds it (:meth:`ModelCache.acquire` or
:meth:`ModelCache.reserve` without :meth:`ModelCache.release`) and the cache is over
``max_mib`` of unpacked file bytes, least recently used first; it runs after every
release and every new entry. An entry in use is never removed, even over the limit.
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import structlog

from agent.errors import ModelStorageError, ModelUnavailable
from agent.fsutil import discard_tree
from agent.models import layout
from agent.models.layout import Entry
from agent.models.unpack import DEFAULT_MAX_MEMBERS
from agent.protocol.messages import ModelSpec

log = structlog.get_logger(__name__)

MIB = 1024 * 1024


class Fetcher(Protocol):
    """What the cache needs of :class:`agent.models.fetch.ArtifactFetcher`."""

    async def fetch(
        self,
        artifact: str,
        expected_sha256: str,
        expected_size: int | None,
        timeout_s: float,
        *,
        max_bytes: int | None = None,
    ) -> Path: ...


class ModelCache:
    """Verified, unpacked models under ``root``, at most ``max_mib`` when none is in use.

    ``max_model_bytes`` (default: ``max_mib``) caps one model, archive and unpacked
    files each; ``max_members`` caps its tar members. The constructor creates and
    scans ``root`` (blocking; call it at startup). All other methods run on the event
    loop's thread.
    """

    def __init__(
        self,
        root: Path,
        max_mib: int | Callable[[], int],
        fetcher: Fetcher,
        *,
        max_model_bytes: int | None = None,
        max_members: int = DEFAULT_MAX_MEMBERS,
    ) -> None:
        self.root = root
        # A callable is read at each use, so that a reload of models.cache_max_mib holds
        # for the next model fetched and the next eviction.
        self._max_mib = max_mib if callable(max_mib) else (lambda: max_mib)
        self._fetcher = fetcher
        self._model_bytes_cap = max_model_bytes
        self._max_members = max_members
        self._entries: dict[str, Entry] = {}
        self._holders: dict[str, str] = {}  # job_id -> sha256
        self._locks: dict[str, asyncio.Lock] = {}
        self._lock_users: Counter[str] = Counter()
        self._staging = root / layout.STAGING
        try:
            self._load()
        except OSError as exc:
            raise ModelStorageError(f"model cache: {exc.strerror}", exc.errno) from exc
        self._evict()

    def model_dir(self, sha256: str) -> Path:
        """Where the unpacked model of ``sha256`` is (or would be)."""
        return self.root / sha256 / layout.MODEL_DIR

    def entries(self) -> dict[str, Entry]:
        """A copy of the index: sha256 → entry."""
        return {sha: Entry(e.sha256, e.bytes, e.last_used) for sha, e in self._entries.items()}

    def total_bytes(self) -> int:
        return sum(e.bytes for e in self._entries.values())

    def in_use(self) -> set[str]:
        """The sha256 of every entry a job holds."""
        return set(self._holders.values())

    # -- jobs --------------------------------------------------------------------------

    def reserve(self, job_id: str, sha256: str) -> None:
        """Hold ``sha256`` for a queued job so that it is not evicted before it starts.

        Idempotent; :meth:`release` ends it. A job holds one model: a second model
        replaces the first.
        """
        self._holders[job_id] = sha256

    async def acquire(self, job_id: str, model: ModelSpec, timeout_s: float) -> Path:
        """The unpacked model dir of ``model.sha256``, held for ``job_id`` until :meth:`release`.

        A verified entry is reused without any request to the CP. Otherwise the artifact
        is fetched, verified and unpacked; concurrent acquires of one sha256 fetch it
        once. ``timeout_s`` bounds the wait for the artifact (unpacking is local work
        bounded by the caps). Raises :class:`~agent.errors.ModelUnavailable` (with
        :class:`~agent.errors.ModelArchiveUnsafe`), ``ModelChecksumMismatch`` or
        ``ModelStorageError``; the job then holds nothing.
        """
        sha = model.sha256
        self._holders[job_id] = sha
        try:
            return await self._acquire(model, timeout_s)
        except BaseException:
            if self._holders.get(job_id) == sha:
                del self._holders[job_id]
            raise

    def release(self, job_id: str) -> None:
        """``job_id`` no longer needs its model; evict if over the limit. Idempotent."""
        sha = self._holders.pop(job_id, None)
        entry = self._entries.get(sha) if sha is not None else None
        if entry is not None:
            self._touch(entry)
        self._evict()

    async def _acquire(self, model: ModelSpec, timeout_s: float) -> Path:
        sha = model.sha256
        deadline = asyncio.get_running_loop().time() + timeout_s
        lock = self._locks.setdefault(sha, asyncio.Lock())
        self._lock_users[sha] += 1
        try:
            try:
                async with asyncio.timeout_at(deadline):
                    await lock.acquire()
            except TimeoutError as exc:
                raise ModelUnavailable(f"model {sha[:12]} not ready in time") from exc
            try:
                entry = self._entries.get(sha)
                if entry is None:
                    remaining = max(0.0, deadline - asyncio.get_running_loop().time())
                    entry = await self._fetch_and_build(model, remaining)
                self._touch(entry)
                return self.model_dir(sha)
            finally:
                lock.release()
        finally:
            self._lock_users[sha] -= 1
            if self._lock_users[sha] == 0:
                del self._lock_users[sha], self._locks[sha]

    async def _fetch_and_build(self, model: ModelSpec, timeout_s: float) -> Entry:
        archive = await self._fetcher.fetch(
            model.artifact, model.sha256, model.size, timeout_s, max_bytes=self._max_model_bytes
        )
        building = asyncio.ensure_future(
            asyncio.to_thread(
                layout.build,
                self.root,
                archive,
                model.sha256,
                max_bytes=self._max_model_bytes,
                max_members=self._max_members,
            )
        )
        try:
            entry = await asyncio.shield(building)
        except asyncio.CancelledError:
            # The thread cannot be stopped; adopt what it builds once it is done.
            building.add_done_callback(self._adopt)
            raise
        self._register(entry)
        return entry

    def _adopt(self, building: asyncio.Future[Entry]) -> None:
        if not building.cancelled() and building.exception() is None:
            self._register(building.result())

    def _register(self, entry: Entry) -> None:
        self._entries[entry.sha256] = entry
        log.info("model_cached", sha256=entry.sha256, bytes=entry.bytes)
        self._evict()

    def _touch(self, entry: Entry) -> None:
        entry.last_used = time.time()
        try:
            os.utime(self.root / entry.sha256 / layout.ENTRY_FILE, (entry.last_used,) * 2)
        except OSError as exc:  # only the order of a later eviction depends on it
            log.warning("model_touch_failed", sha256=entry.sha256, error=exc.strerror)

    def _load(self) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        self._clear_staging()
        for path, entry in list(layout.scan(self.root)):
            if entry is None:
                log.warning("model_entry_incomplete", sha256=path.name)
                self._discard(path)
            else:
                self._entries[entry.sha256] = entry

    def _clear_staging(self) -> None:
        """Empty ``.staging``: its leftovers go like discarded entries, and what cannot be
        removed is logged and stays (new names never collide with it). Raises OSError
        only when ``.staging`` itself cannot be made or listed."""
        if not self._staging.is_dir() or self._staging.is_symlink():
            discard_tree(self._staging, event="model_staging_cleanup_failed")
        self._staging.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self._staging, 0o700)
        with os.scandir(self._staging) as entries:
            leftovers = [Path(entry.path) for entry in entries]
        for leftover in leftovers:
            self._remove_later(leftover, "model_staging_cleanup_failed")

    @property
    def max_bytes(self) -> int:
        return self._max_mib() * MIB

    @property
    def _max_model_bytes(self) -> int:
        return self.max_bytes if self._model_bytes_cap is None else self._model_bytes_cap

    def _evict(self) -> None:
        total = self.total_bytes()
        if total <= self.max_bytes:
            return
        held = self.in_use()
        for entry in sorted(self._entries.values(), key=lambda e: e.last_used):
            if total <= self.max_bytes:
                break
            if entry.sha256 in held:
                continue
            del self._entries[entry.sha256]
            total -= entry.bytes
            log.info("model_evicted", sha256=entry.sha256, bytes=entry.bytes)
            self._discard(self.root / entry.sha256)

    def _discard(self, path: Path) -> None:
        """Move ``path`` out of sight at once (atomic rename), delete it in a thread."""
        trash = self._staging / f"evicted-{path.name}-{time.monotonic_ns()}"
        try:
            os.rename(path, trash)
        except OSError as exc:
            log.warning("model_discard_failed", name=path.name, error=exc.strerror)
            return
        self._remove_later(trash, "model_discard_failed")

    def _remove_later(self, path: Path, event: str) -> None:
        """Delete ``path`` (in ``.staging``) in a worker thread, or here without a loop.

        Never raises: a failure is logged as ``event`` and retried at the next start.
        """
        remove = functools.partial(discard_tree, path, event=event)
        try:
            asyncio.get_running_loop().run_in_executor(None, remove)
        except RuntimeError:  # no event loop: delete here
            remove()
