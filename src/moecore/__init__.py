"""moecore: compress Mixture-of-Experts LLMs into a shared core per projection plus
small per-expert low-rank factors.

``import moecore`` is cheap (no torch): the public names below are loaded from their modules
on first use (PEP 562), and the ``"moecore"`` quantization method is registered with
transformers as soon as transformers loads its quantizers (:mod:`moecore.hf_hook`), so
``AutoModelForCausalLM.from_pretrained(dir)`` loads compressed checkpoints natively.
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from . import hf_hook as _hf_hook
from .version import __version__

if TYPE_CHECKING:  # what the lazy names resolve to, for type checkers and readers
    from .api import compress, compress_checkpoint
    from .config import CompressionConfig
    from .families import ExpertsLayout, register_layout
    from .forms import register_form
    from .io import export_dense, save_compressed
    from .planning import plan
    from .stats import statistics

#: public name -> the module that defines it (imported on first access)
_LAZY = {
    "compress": "moecore.api",
    "compress_checkpoint": "moecore.api",
    "CompressionConfig": "moecore.config",
    "ExpertsLayout": "moecore.families",
    "register_layout": "moecore.families",
    "register_form": "moecore.forms",
    "export_dense": "moecore.io",
    "save_compressed": "moecore.io",
    "plan": "moecore.planning",
    "statistics": "moecore.stats",
}

__all__ = ["__version__", "compress", "compress_checkpoint", "CompressionConfig", "statistics", "save_compressed",
           "export_dense", "plan", "ExpertsLayout", "register_layout", "register_form"]

_hf_hook.install()


def __getattr__(name: str) -> Any:
    """The public API on first use (``moecore.compress`` imports :mod:`moecore.api`), and
    ``moecore.<submodule>`` for a submodule not imported yet."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
