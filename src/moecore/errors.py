"""Exception types. Every failure the user can cause or fix raises a subclass of
:class:`MoecoreError`, which the CLI prints as one line and exit status 2.  Anything else
(a built-in ``ValueError``, ``OSError``, ...) is a bug and keeps its traceback: an ``OSError``
on a path the user named is turned into :class:`FileAccessError` or :class:`CheckpointError`
where that path is read or written (:func:`moecore.io_utils.user_path`)."""


class MoecoreError(Exception):
    """Base class for moecore errors."""


class ConfigError(MoecoreError, ValueError):
    """An invalid compression / training configuration (bad rank, ratio, form, ...)."""


class UnsupportedModelError(MoecoreError, TypeError):
    """The model is not a Mixture-of-Experts model, or has an experts layout moecore can't handle."""


class CheckpointError(MoecoreError, OSError):
    """A model directory is missing, incomplete or corrupt, or an output can't be written safely."""


class FileAccessError(MoecoreError, OSError):
    """A file or folder the user named cannot be read or written (missing, a folder where a file
    is expected, permission denied, ...)."""


class DataError(MoecoreError, ValueError):
    """A text file or token stream is unusable (bad JSONL value, no text, degenerate tokens)."""


class TrainingError(MoecoreError, RuntimeError):
    """Training or recovery cannot go on (non-finite teacher outputs or loss, mismatched teacher)."""


class MissingDependencyError(MoecoreError, ImportError):
    """An optional dependency of the requested feature is not installed (names the pip extra)."""


class MemoryWarning(UserWarning):
    """``compress_checkpoint``'s memory estimate for its largest layer (``moecore plan``'s)
    is above the memory free on the machine now: the run would likely be killed part-way."""


class DataFreeWarning(UserWarning):
    """``moecore.compress`` / ``compress_checkpoint`` ran without calibration text while the
    config asked for the activation-aware init (``init="auto"``): the data-free init was used.
    Pass calibration text, or ``CompressionConfig(init="svd")`` to choose the data-free init."""


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (its class name when it has none): how moecore
    quotes an underlying error in its own one-line messages."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
