"""The process around the daemon: umask, logging, the asyncio run, the exit status."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import structlog

from agent import logs
from agent.config import Config
from agent.config.host_warnings import host_warnings
from agent.daemon import Daemon
from agent.errors import HealthServerError
from agent.gpu.base import GpuBackend
from agent.runtime.base import Runtime
from agent.systemd import Notifier

log = structlog.get_logger(__name__)


def serve(
    config: Config,
    *,
    gpu: GpuBackend,
    runtime: Runtime,
    config_path: Path | None = None,
) -> int:
    """Configure logging, run the daemon to completion, return the process exit status.

    Sets the process umask to 0077 first, whoever started the daemon (the CLI, a test
    launcher, a shell without systemd's ``UMask=``): everything it creates (the job
    store and its ``-wal``/``-shm`` files, spool, ledger) is the owner's alone.
    Raises :class:`~agent.errors.StateDirError` when the state directory cannot be
    made private (``agent.statedir``).
    """
    os.umask(0o077)
    logs.configure(config.logging.level, config.logging.format)
    for line in host_warnings(config):  # what check-config prints as a warning
        log.warning("config_warning", problem=line)
    notifier = Notifier()
    daemon = Daemon(config, gpu=gpu, notifier=notifier, runtime=runtime, config_path=config_path)
    try:
        asyncio.run(daemon.run())
    except HealthServerError as exc:
        log.error("agent_failed", error=str(exc))
        return 1
    except asyncio.CancelledError:
        log.warning("agent_cancelled")
    finally:
        notifier.close()
    return 1 if daemon.failure is not None else 0
