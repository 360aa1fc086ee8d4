"""Settings that are valid but that this machine will not honour as written.

These are warnings, not problems: ``check-config`` prints them and still exits 0, and
``run`` logs them at start. A config is often written once and copied to nodes of
different sizes, so refusing it would be wrong; staying silent would leave an
administrator believing a job may use more than it will get.
"""

from __future__ import annotations

import grp
import os

import psutil

from agent.config.models import Config
from agent.tls_expiry import expiry_warnings


def node_cpus() -> int:
    """This machine's logical CPUs, counted as the job admission counts them."""
    return int(psutil.cpu_count(logical=True) or os.cpu_count() or 1)


def host_warnings(config: Config, *, cpus: int | None = None) -> list[str]:
    """One ``key: words`` line per setting this machine cannot honour, for ``config``.

    ``cpus`` is the node's logical CPU count (default: :func:`node_cpus`). Only keys the
    file sets are judged: a default is never the administrator's claim. Raises nothing.
    """
    warnings = []
    cpus = cpus or node_cpus()
    limits = config.limits
    if "max_cpus" in limits.model_fields_set and limits.max_cpus > cpus:
        warnings.append(
            f"limits.max_cpus: {limits.max_cpus:g} is more than this node's {cpus} CPU(s); "
            f"a job gets at most {cpus}"
        )
    control = config.control
    if "group" in control.model_fields_set and not _group_exists(control.group):
        # Root can still use the control socket; nobody else can until the group exists.
        warnings.append(
            f"control.group: group {config.control.group!r} does not exist on this host; "
            f"only root may use the control socket (groupadd --system {config.control.group})"
        )
    # A certificate about to expire is valid today, and a node down in a week.
    warnings += expiry_warnings(config.control_plane)
    return warnings


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True
