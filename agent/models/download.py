"""One artifact download: its partial file, its hash, and the verification rules. No asyncio.

Rules, where docs/protocol.md §6 is silent:

- A chunk is kept only when its ``offset`` equals the bytes held; any other (a
  duplicate, a gap) is dropped. The bytes held are thus always a prefix of the
  artifact as served, and the final sha256 decides.
- A chunk that would go past the expected size is a mismatch at once; without an
  expected size, one past ``cap`` makes the artifact unavailable (too large).
- ``artifact.end`` must name the assignment's sha256 (binding) and, when the
  assignment gives one, its size; else a mismatch. An end whose ``size`` is below the
  bytes held is a mismatch too. An end whose ``size`` is above them (a gap, or a stale
  end from an earlier request in the same session) asks for the rest again from the
  bytes held; more than :data:`MAX_SHORT_ENDS` such ends without progress in between
  are a mismatch. An end that accounts for every byte is checked against the sha256
  of what was written.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import structlog

from agent.errors import ModelChecksumMismatch, ModelError, ModelStorageError, ModelUnavailable

log = structlog.get_logger(__name__)

MAX_SHORT_ENDS = 3
_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class Download:
    """The bytes of one artifact as they arrive, written to ``part`` (created ``0600``).

    Raises :class:`ModelStorageError` when ``part`` cannot be created. The owner must
    call :meth:`close` once, and remove ``part`` unless the download is complete.
    """

    def __init__(
        self, artifact: str, sha256: str, size: int | None, cap: int | None, part: Path
    ) -> None:
        self.artifact, self.sha256, self.size, self.cap = artifact, sha256, size, cap
        self.part = part
        self.held = 0
        self.complete = False
        self.failure: ModelError | None = None
        self._hash = hashlib.sha256()
        self._short_ends = 0
        self._short_end_held = -1
        try:
            self._out = os.fdopen(os.open(part, _FLAGS, 0o600), "wb")
        except OSError as exc:
            raise ModelStorageError(f"spool: {exc.strerror}", exc.errno) from exc

    @property
    def open(self) -> bool:
        """Neither complete nor failed: chunks and ends still count."""
        return not self.complete and self.failure is None

    def fail(self, error: ModelError) -> None:
        if self.open:
            log.warning("artifact_failed", artifact=self.artifact, held=self.held, error=str(error))
            self.failure = error

    def take_chunk(self, offset: int, payload: bytes | memoryview) -> bool:
        """Append ``payload`` if it starts at the bytes held. True if it was kept."""
        if not self.open or offset != self.held:
            return False
        n = len(payload)
        if self.size is not None and self.held + n > self.size:
            self.fail(
                ModelChecksumMismatch(f"artifact {self.artifact!r} exceeds {self.size} bytes")
            )
            return False
        if self.cap is not None and self.held + n > self.cap:
            self.fail(ModelUnavailable(f"artifact {self.artifact!r} exceeds the cache size"))
            return False
        try:
            self._out.write(payload)
        except OSError as exc:
            self.fail(ModelStorageError(f"spool: {exc.strerror}", exc.errno))
            return False
        self._hash.update(payload)
        self.held += n
        return True

    def take_end(self, size: int, sha256: str) -> bool:
        """Judge an ``artifact.end``. True when the rest must be asked for again.

        Afterwards the download is complete, failed, or (True) still open.
        """
        if not self.open:
            return False
        name = repr(self.artifact)
        if sha256 != self.sha256:
            self.fail(ModelChecksumMismatch(f"artifact.end of {name} names another sha256"))
        elif self.size is not None and size != self.size:
            self.fail(ModelChecksumMismatch(f"artifact.end of {name} says {size} bytes"))
        elif size < self.held:
            self.fail(ModelChecksumMismatch(f"{name}: more bytes sent than artifact.end says"))
        elif size > self.held:
            if self.held > self._short_end_held:
                self._short_end_held, self._short_ends = self.held, 0
            self._short_ends += 1
            if self._short_ends <= MAX_SHORT_ENDS:
                log.info("artifact_end_short", artifact=self.artifact, held=self.held, size=size)
                return True
            self.fail(ModelChecksumMismatch(f"{name}: the stream keeps ending short"))
        elif self._hash.hexdigest() != self.sha256:
            self.fail(ModelChecksumMismatch(f"the bytes of {name} do not match its sha256"))
        else:
            try:
                self._out.close()
            except OSError as exc:
                self.fail(ModelStorageError(f"spool: {exc.strerror}", exc.errno))
                return False
            self.complete = True
        return False

    def close(self) -> None:
        """Close the partial file (idempotent); never raises."""
        try:
            self._out.close()
        except OSError as exc:
            log.warning("artifact_close_failed", artifact=self.artifact, error=exc.strerror)
