"""``cloudbender-agent doctor``: a preflight a person runs before calling anyone.

One line per check: ``✓`` fine, ``⚠`` worth knowing (does not fail), ``✗`` broken, with
the fix on the next line, ``-`` not applicable. :func:`run_doctor` returns ``True``
when no line is ``✗``; ``agent.cli`` turns that into the exit code.

Order matters: the datastore walk forks (``agent.datastore_access``), so it runs
before anything that may start a thread (the Docker SDK, asyncio for the dial).

A config with problems does not stop the report: each problem is a ``✗`` line, and
the checks run on the sections that are valid on their own (defaults elsewhere).
"""

from __future__ import annotations

from pathlib import Path
from typing import TextIO

from agent.config import Config
from agent.config.loading import load_sections
from agent.doctor_checks import (
    Check,
    control_plane,
    datastores,
    engine,
    free_space,
    gpu_runtime,
    token_file,
)
from agent.doctor_unit import check_unit
from agent.errors import ConfigError

MARKS = {"ok": "✓", "warn": "⚠", "fail": "✗", "skip": "-"}
SECTIONS = (
    "node",
    "control_plane",
    "state_dir",
    "runtime",
    "gpus",
    "datastores",
    "limits",
    "results",
    "models",
    "health",
    "logging",
)


def load_for_doctor(path: Path | None) -> tuple[Config, list[Check]]:
    """The config from the sections that validate alone, and a ``✗`` per problem.
    Raises :class:`ConfigError` when the file cannot be read or is not YAML."""
    _, problems = load_sections(path, [])
    good = []
    for section in SECTIONS:
        try:
            load_sections(path, [section])
        except ConfigError:
            continue
        good.append(section)
    config, _ = load_sections(path, good)
    checks = [Check("fail", f"config: {p}", "cloudbender-agent check-config") for p in problems]
    if not problems:
        checks.append(Check("ok", "config is valid"))
    return config, checks


def run_doctor(path: Path | None, out: TextIO, *, unit: Path | None = None) -> bool:
    """Print the report to ``out``, each line as soon as it is known; ``True`` if no ``✗``."""
    config, first = load_for_doctor(path)
    failed = False

    def emit(checks: list[Check]) -> None:
        nonlocal failed
        for check in checks:
            failed |= check.mark == "fail"
            out.write(f"{MARKS[check.mark]} {check.what}\n")
            if check.fix and check.mark in ("fail", "warn"):
                out.write(f"    fix: {check.fix}\n")
            out.flush()

    emit(first)
    emit(datastores(config.datastores, config.runtime.job_user))  # forks: first
    if config.control_plane is not None:
        emit([token_file(config.control_plane)])
    emit([free_space(config.state_dir, config.limits.min_free_mib)])
    emit(check_unit(config, unit))
    emit(_engine_and_gpus(config))
    emit([control_plane(config.control_plane)])
    return not failed


def _engine_and_gpus(config: Config) -> list[Check]:
    from agent.gpu.nvml import NvmlBackend
    from agent.runtime.docker import DockerRuntime

    info = DockerRuntime(config.runtime.docker_host, timeout_s=10).info()
    backend = NvmlBackend()
    try:
        inventory = backend.snapshot()
    finally:
        backend.close()
    return [
        engine(info, config.runtime.docker_host),
        gpu_runtime(len(inventory.gpus), inventory.reason, info),
    ]
