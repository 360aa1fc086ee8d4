"""YAML configuration → one frozen, typed :class:`Config`.

The config is parsed once, at the edge (``load_config``), and each part of the agent is
handed only its own slice. Every problem is collected before anything is reported, so
``check-config`` can print all of them at once, each with the dotted key path of the
offending value (``datastores[0].path: /srv/x does not exist``).

Validation is pydantic in strict mode: no silent coercion (``"30"`` is not ``30``),
unknown keys are errors at every level; ``messages`` puts its errors in the project's
words. Rules that need the file system or the network policy (datastore paths, token
file permissions, ``ws://`` and the health listener's address) run as validators too,
and a duplicate YAML key is one more problem, so all are reported together.
"""

from agent.config.loading import (
    CONFIG_ENV,
    DEFAULT_CONFIG_PATH,
    default_config_path,
    load_config,
    parse_config,
)
from agent.config.messages import format_location
from agent.config.models import (
    Config,
    ControlPlaneConfig,
    DatastoreConfig,
    GpusConfig,
    HealthConfig,
    LimitsConfig,
    LoggingConfig,
    ModelsConfig,
    NodeConfig,
    ReconnectConfig,
    ResultsConfig,
    RuntimeConfig,
    is_loopback_host,
    split_host_port,
)

__all__ = [
    "CONFIG_ENV",
    "DEFAULT_CONFIG_PATH",
    "Config",
    "ControlPlaneConfig",
    "DatastoreConfig",
    "GpusConfig",
    "HealthConfig",
    "LimitsConfig",
    "LoggingConfig",
    "ModelsConfig",
    "NodeConfig",
    "ReconnectConfig",
    "ResultsConfig",
    "RuntimeConfig",
    "default_config_path",
    "format_location",
    "is_loopback_host",
    "load_config",
    "parse_config",
    "split_host_port",
]
