"""moecore: compress Mixture-of-Experts LLMs into a shared core per projection plus
small per-expert low-rank factors."""
from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("moecore")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+local"
