"""The stages of gsae: caching activations (stage one), grouping layers and training SAEs (stage two)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("gsae")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"
