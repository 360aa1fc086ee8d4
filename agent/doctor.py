"""``cloudbender-agent doctor``: a preflight a person runs before calling anyone.

One line per check: ``✓`` fine, ``⚠`` worth knowing (does not fail), ``✗`` broken, with
the fix on the next line, ``-`` not applicable. :func:`run_doctor` returns ``True``
when no line is ``✗``; ``agent.cli`` turns that into the exit code.

Order matters: the datastore walk forks (``agent.datastore_access``), so it runs
before anything that may start a thread (the Docker SDK, asyncio for the dial).

A config with problems does not stop the report: each problem is a ``✗`` line, and
the checks run on the sections that are valid on their own. A check that needs an
invalid section is not run on the defaults (that would report on a state directory or
a control plane the config does not name): its line is a ``✗`` saying it was not
checked. The token file's mode is still checked, from the raw path in the YAML, since
a bad mode is the most common reason the ``control_plane`` section is invalid.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import yaml

from agent.config import Config, default_config_path
from agent.config.loading import load_sections
from agent.doctor_checks import (
    Check,
    certificate_expiry,
    control_group,
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
    "control",
)


@dataclass(frozen=True)
class DoctorConfig:
    """What doctor may rely on: ``config`` is true only for the sections not in ``bad``."""

    config: Config
    checks: list[Check]
    bad: frozenset[str]
    raw_token_file: Path | None


def load_for_doctor(path: Path | None) -> DoctorConfig:
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
    bad = frozenset(SECTIONS) - frozenset(good)
    return DoctorConfig(config, checks, bad, _raw_token_file(path or default_config_path()))


def _raw_token_file(path: Path) -> Path | None:
    # The file already parsed once in load_sections; anything odd here means there is
    # no usable path, which the config lines above have already reported.
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    cp = data.get("control_plane") if isinstance(data, dict) else None
    raw = cp.get("token_file") if isinstance(cp, dict) else None
    return Path(raw) if isinstance(raw, str) and raw else None


def not_checked(what: str, sections: frozenset[str]) -> Check:
    """The line for a check skipped because a section it needs is invalid: a ``✗``,
    since the node has not been shown to be fine."""
    names = ", ".join(sorted(sections))
    return Check(
        "fail",
        f"{what}: not checked, because of the config problem in {names} shown above",
        "cloudbender-agent check-config",
    )


def run_doctor(path: Path | None, out: TextIO, *, unit: Path | None = None) -> bool:
    """Print the report to ``out``, each line as soon as it is known; ``True`` if no ``✗``."""
    loaded = load_for_doctor(path)
    config, bad = loaded.config, loaded.bad
    failed = False

    def emit(checks: list[Check]) -> None:
        nonlocal failed
        for check in checks:
            failed |= check.mark == "fail"
            out.write(f"{MARKS[check.mark]} {check.what}\n")
            if check.fix and check.mark in ("fail", "warn"):
                out.write(f"    fix: {check.fix}\n")
            out.flush()

    def blocked(what: str, *needs: str) -> bool:
        # Emits the "not checked" line when a section the check needs is invalid.
        missing = bad & frozenset(needs)
        if missing:
            emit([not_checked(what, missing)])
        return bool(missing)

    emit(loaded.checks)
    if not blocked("datastores readable by the job user", "datastores", "runtime"):
        emit(datastores(config.datastores, config.runtime.job_user))  # forks: first
    if config.control_plane is not None:
        emit([token_file(config.control_plane.token_file)])
    elif loaded.raw_token_file is not None:
        emit([token_file(loaded.raw_token_file)])
    if not blocked("free space in the state directory", "state_dir", "limits"):
        emit([free_space(config.state_dir, config.limits.min_free_mib)])
    if not blocked("the systemd unit against state_dir", "state_dir"):
        emit(check_unit(config, unit))
    if not blocked("the Docker engine and the GPU runtime", "runtime"):
        emit(_engine_and_gpus(config))
    if not blocked("the control socket's group", "control"):
        emit([control_group(config.control.group)])
    if not blocked("the control plane and the token", "control_plane"):
        emit(certificate_expiry(config.control_plane))
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
