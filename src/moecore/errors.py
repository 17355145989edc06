"""Exception types. Every user-facing failure raises a subclass of :class:`MoecoreError`
(or a built-in ``FileNotFoundError``), which the CLI prints as a one-line error."""


class MoecoreError(Exception):
    """Base class for moecore errors."""


class ConfigError(MoecoreError, ValueError):
    """An invalid compression / training configuration (bad rank, ratio, form, ...)."""


class UnsupportedModelError(MoecoreError, TypeError):
    """The model is not a Mixture-of-Experts model, or has an experts layout moecore can't handle."""


class CheckpointError(MoecoreError, OSError):
    """A model directory is missing, incomplete or corrupt."""
