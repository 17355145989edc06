"""The installed moecore version (``0.0.0+local`` when running from a source tree without install)."""
from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("moecore")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+local"
