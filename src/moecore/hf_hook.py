"""Register moecore's quantization method with transformers when transformers loads its
quantizers, not when moecore is imported.

``AutoModelForCausalLM.from_pretrained(dir)`` finds the ``"moecore"`` quantizer of a
compressed checkpoint in ``transformers.quantizers.auto``'s mappings.  Importing that module
costs seconds (it imports every quantizer transformers ships, and with them
``torch._inductor``, ``torch.distributed.tensor``, ``scipy.optimize`` and hqq), so
``import moecore`` calls :func:`install`: if the module is already loaded, moecore registers
at once; otherwise a finder on ``sys.meta_path`` (:class:`QuantizerHook`) waits for it and,
right after transformers has executed it, imports :mod:`moecore.hf_integration`, which
registers on import (and imports torch, transformers' model code and hqq: only then).  Either
way the quantizer is known before any ``from_pretrained`` can ask for it.  Torch-free.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import threading
from types import ModuleType
from typing import Any, Sequence

#: the transformers module holding the quantizer mappings
TARGET = "transformers.quantizers.auto"
#: the moecore module that registers the quantizer when imported
INTEGRATION = "moecore.hf_integration"

_lock = threading.Lock()


def register_now() -> None:
    """Import :mod:`moecore.hf_integration` (which registers the quantizer) unless it is already
    imported or being imported (then its own import registers)."""
    if INTEGRATION not in sys.modules:
        importlib.import_module(INTEGRATION)


class _RegisterAfterExec(importlib.abc.Loader):
    """Wraps the target module's loader: executes the module, then registers moecore.
    Anything else (``get_source``, resource readers, ...) is the wrapped loader's."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        uninstall()  # the module is loaded now: the finder has nothing left to wait for
        register_now()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class QuantizerHook(importlib.abc.MetaPathFinder):
    """A ``sys.meta_path`` finder that answers only for :data:`TARGET`: it asks the other
    finders for the real spec and wraps its loader in one that registers moecore once the
    module has executed."""

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None):
        if fullname != TARGET:
            return None
        for finder in list(sys.meta_path):
            find = getattr(finder, "find_spec", None)
            spec = None if finder is self or find is None else find(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _RegisterAfterExec(spec.loader)
        return spec


def _hooks() -> list[QuantizerHook]:
    return [f for f in sys.meta_path if isinstance(f, QuantizerHook)]


def install() -> None:
    """Make sure moecore is registered with transformers by the time it can be needed: at once
    if ``transformers.quantizers.auto`` is loaded, else right after it loads (idempotent)."""
    if TARGET not in sys.modules:
        with _lock:
            if not _hooks():
                sys.meta_path.insert(0, QuantizerHook())
        if TARGET not in sys.modules:  # else another thread loaded it meanwhile, maybe past the hook
            return
    uninstall()
    register_now()


def uninstall() -> None:
    """Remove the finder from ``sys.meta_path`` (nothing to do if it is not there)."""
    with _lock:
        for hook in _hooks():
            sys.meta_path.remove(hook)
