"""The agent's one exception root.

Every module raises a subclass of :class:`AgentError`, chained with ``raise … from``
to the low-level cause; only ``agent.cli`` turns them into exit codes.

::

    AgentError
    ├── ConfigError          the YAML config is unreadable or invalid (exit 78, EX_CONFIG)
    ├── GpuError             the GPU backend failed in a way the caller must see
    ├── HealthServerError    the loopback health server could not start (port taken, bad address)
    └── DaemonUnreachable    a CLI command found no daemon answering on the health address

Error messages never contain the control-plane token.
"""

from __future__ import annotations


class AgentError(Exception):
    """Root of every error the agent raises on purpose."""


class ConfigError(AgentError):
    """The configuration cannot be used.

    ``problems`` holds every problem found, each a line of the form
    ``dotted.key[0].path: what is wrong``, so that a person can fix them all at once.
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems) if self.problems else "invalid configuration")


class GpuError(AgentError):
    """The GPU backend failed in a way that the caller has to handle."""


class HealthServerError(AgentError):
    """The health server could not be started."""


class DaemonUnreachable(AgentError):
    """No daemon answered on the configured health address."""
