"""cloudbender-agent: the consumer-side node agent for federated inference."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cloudbender-agent")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
