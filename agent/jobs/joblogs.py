"""A job's own stdout/stderr, kept on the node after its container is gone.

The runner calls :meth:`JobLogs.capture` just before it removes an ended job's
container: the last ``logging.job_log_tail_kib`` KiB the engine kept are written to
``<state_dir>/logs/<job_id>.log``, mode 0600 in a 0700 directory (root only: a job's
output may quote the consumer's data). The file is never sent anywhere; ``logs JOB``
reads it, and it is deleted with the job's record (:meth:`JobStore.forget_old`).

The bytes are the job's and hostile: whoever prints them escapes them
(:func:`render_log`). The job id becomes a file name only through
:func:`agent.paths.child`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

import structlog

from agent.errors import AgentError
from agent.escaping import escape
from agent.fsutil import write_atomic
from agent.paths import child
from agent.runtime.base import Runtime

log = structlog.get_logger(__name__)

LOGS_DIRNAME = "logs"


def logs_dir(state_dir: Path) -> Path:
    """Where the job logs of an agent with ``state_dir`` live."""
    return state_dir / LOGS_DIRNAME


def log_path(directory: Path, job_id: str) -> Path:
    """``<directory>/<job_id>.log``. Raises :class:`~agent.paths.UnsafeName`."""
    return child(directory, f"{job_id}.log")


class JobLogs:
    """Captures job logs into ``directory``; ``max_bytes`` is read at each capture, so
    a reload of ``logging.job_log_tail_kib`` applies to the next job that ends."""

    def __init__(self, directory: Path, max_bytes: Callable[[], int]) -> None:
        self.directory = directory
        self._max_bytes = max_bytes

    def capture(self, runtime: Runtime, job_id: str, container_id: str) -> None:
        """Save the container's log tail. Blocking; never raises (a log that cannot be
        kept must not keep the container or the job's end from being cleaned up)."""
        cap = self._max_bytes()
        if cap <= 0:
            return
        try:
            data = runtime.logs(container_id, cap)[-cap:]
            write_private(log_path(self.directory, job_id), data)
        except (AgentError, OSError) as exc:
            log.warning("job_log_not_kept", job_id=job_id, error=str(exc))


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all, mode 0600, its directory 0700.
    Raises ``OSError``. Not fsynced: a log tail lost in a crash costs nothing."""
    path.parent.mkdir(mode=0o700, exist_ok=True)
    os.chmod(path.parent, 0o700)
    write_atomic(path, data, durable=False)


def remove_logs(directory: Path, job_ids: Iterable[str]) -> None:
    """Delete the logs of ``job_ids`` (forgotten jobs). Idempotent; never raises."""
    for job_id in job_ids:
        try:
            log_path(directory, job_id).unlink(missing_ok=True)
        except (AgentError, OSError) as exc:
            log.warning("job_log_not_removed", job_id=job_id, error=str(exc))


def read_log(directory: Path, job_id: str) -> bytes | None:
    """The kept log of ``job_id``; ``None`` when none was kept. Raises ``OSError``
    (permission) or :class:`~agent.paths.UnsafeName`."""
    try:
        fd = os.open(log_path(directory, job_id), os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        return f.read()


def render_log(data: bytes, tail: int | None) -> list[str]:
    """The last ``tail`` lines of ``data`` (all when ``None``), each escaped: no byte of
    the job's output can move the cursor, clear the screen or forge a line. Bytes that
    are not UTF-8 are shown as ``\\udcNN``."""
    text = data.decode("utf-8", errors="surrogateescape")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line starts no new one
    if tail is not None:
        lines = lines[-tail:] if tail > 0 else []
    return [escape(line) for line in lines]
