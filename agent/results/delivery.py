"""From an exited job to accepted results: spool, stream, record, clean up.

The job runner calls :meth:`ResultDelivery.deliver` while the job is ``uploading``.
It returns once the control plane has accepted every file, or raises an error whose
``reason`` is the job's failure reason (``result_invalid``, ``result_too_large``,
``no_space``, ``agent_error``).
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable
from pathlib import Path

import structlog

from agent.errors import AgentError
from agent.results.scan import ResultFile
from agent.results.spool import Manifest, Spool
from agent.results.uploader import Uploader

log = structlog.get_logger(__name__)


class SpoolFull(AgentError):
    reason = "no_space"


class ResultDelivery:
    def __init__(
        self,
        spool: Spool,
        uploader: Uploader,
        *,
        on_accepted: Callable[[Manifest], object] | None = None,
    ) -> None:
        self.spool = spool
        self.uploader = uploader
        self._on_accepted = on_accepted

    async def spool_output(
        self, job_id: str, output_dir: Path, max_bytes: int, max_files: int
    ) -> Manifest:
        """Check and copy the output into the spool (or reuse a complete earlier copy).

        The output is left as it is: the caller removes it once this returns, when the
        spool's copy and its manifest are durable."""
        manifest = self.spool.load(job_id)
        if manifest is not None:
            return manifest  # spooled before a restart: the output dir may be gone
        try:
            manifest = await asyncio.to_thread(
                self.spool.store, job_id, output_dir, max_bytes, max_files
            )
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise SpoolFull(f"spool is full: {exc.strerror}") from exc
            raise AgentError(f"spooling results failed: {exc.strerror}") from exc
        log.info(
            "results_spooled", job_id=job_id, files=len(manifest.files), bytes=manifest.total_bytes
        )
        return manifest

    async def deliver(self, manifest: Manifest) -> None:
        await self.uploader.deliver(manifest)
        self.spool.mark_delivered(manifest.job_id)
        if self._on_accepted is not None:
            self._on_accepted(manifest)


__all__ = ["ResultDelivery", "ResultFile", "SpoolFull"]
