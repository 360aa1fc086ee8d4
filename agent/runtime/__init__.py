"""The container runtime: job containers isolated as docs/runtime.md requires.

``base`` holds the value types and the :class:`~agent.runtime.base.Runtime` interface,
``spec`` turns a :class:`~agent.runtime.base.ContainerSpec` into the engine's create
arguments, ``verify`` checks the created container against them, ``images`` parses
image references; all four are pure. ``pull`` follows one pull over the engine's HTTP
API. ``docker`` is the one real backend and the only module that imports ``docker``.
See docs/runtime.md.
"""

from agent.runtime.base import ContainerSpec, ContainerState, Runtime, RuntimeInfo
from agent.runtime.spec import create_kwargs, env_problems
from agent.runtime.verify import isolation_summary, verify_attrs

__all__ = [
    "ContainerSpec",
    "ContainerState",
    "Runtime",
    "RuntimeInfo",
    "create_kwargs",
    "env_problems",
    "isolation_summary",
    "verify_attrs",
]
