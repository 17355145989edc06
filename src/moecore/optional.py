"""Optional dependencies: the core (compress / stats / plan / save / load / export) needs none
of them; a feature that does imports its library through :func:`require`, which names the
pip extra to install when it is missing."""
from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MissingDependencyError

# import name -> the extra of ``pip install 'moecore[EXTRA]'`` that provides it
EXTRAS = {"lm_eval": "eval", "datasets": "eval", "matplotlib": "plot"}


def require(module: str, feature: str) -> ModuleType:
    """Import ``module`` (e.g. ``"lm_eval.tasks"``) for ``feature``, or raise
    :class:`MissingDependencyError` saying which extra provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        if exc.name is not None and exc.name.split(".")[0] != top:
            raise  # the library is there but itself broken: a real bug, keep the traceback
        extra = EXTRAS.get(top, "all")
        raise MissingDependencyError(f"{feature} needs {top}, which is not installed: pip install 'moecore[{extra}]'") from exc
