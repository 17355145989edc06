"""The forms of the compressed experts, by name: ``get_form("delta")``, ``FORMS``.

Every module of this package other than :mod:`.base` defines one :class:`~.base.Form`, named
as the module, as its module-level ``FORM`` and is registered here (sorted by module name), so
adding a form means adding one file.  A form defined elsewhere (a plugin, a test) is added with
:func:`register_form` (and removed with :func:`unregister_form`); everything else in moecore (module, storage, quantized storage,
statistics, training, loading) asks the form object and names none.  The registry also makes the forms known by name to
:mod:`moecore.maths.budget` (which, being pure maths, does not import this package).

Importing this package is cheap (no torch): :data:`DEFAULT_FORM` and :data:`FORM_NAMES` (the
form modules found on disk, not imported) are what :class:`~moecore.config.CompressionConfig`
and the command line need.  The form modules are imported and registered on first use of
anything else: ``FORMS``, ``PROJECTIONS``, ``Form``, ``FitResult`` (PEP 562 module
``__getattr__``; ``from moecore.forms import FORMS`` loads them), :func:`get_form`,
:func:`quantizable_forms`.
"""
from __future__ import annotations

import importlib
import pkgutil
import threading
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError

if TYPE_CHECKING:  # loaded on first use (see __getattr__)
    from .base import PROJECTIONS, FitResult, Form

#: the form of :class:`moecore.CompressionConfig` (per-expert ranks: the best held-out quality
#: measured at equal stored parameters, benchmarks/RESULTS.md §3g)
DEFAULT_FORM = "ragged"
#: the form of a checkpoint whose ``quantization_config`` names none (written before forms were named)
CHECKPOINT_FORM = "delta"

#: names of every form (the modules of this package but ``base``), sorted; found without importing them
FORM_NAMES: tuple[str, ...] = tuple(sorted(m.name for m in pkgutil.iter_modules(__path__)
                                           if m.name != "base" and not m.name.startswith("_")))

_LAZY = ("FORMS", "PROJECTIONS", "FitResult", "Form")
_lock = threading.RLock()


def _load() -> dict[str, Form]:
    """Import :mod:`.base` and every form module, register each form with
    :mod:`moecore.maths.budget`, and bind the lazy names; returns ``FORMS`` (once)."""
    with _lock:
        if "FORMS" in globals():
            return globals()["FORMS"]
        base = importlib.import_module(f"{__name__}.base")
        budget = importlib.import_module("moecore.maths.budget")
        found: dict[str, Form] = {}
        for name in FORM_NAMES:
            form = getattr(importlib.import_module(f"{__name__}.{name}"), "FORM", None)
            if not isinstance(form, base.Form) or form.name != name:
                # named as its module, so that FORM_NAMES lists the forms without importing them
                raise TypeError(f"{__name__}.{name} must define FORM, a Form named {name!r}")
            found[name] = form
        for form in found.values():
            budget.register_form(form)
        globals().update(PROJECTIONS=base.PROJECTIONS, FitResult=base.FitResult, Form=base.Form)
        globals()["FORMS"] = found  # last: its presence means everything is loaded
        return found


def __getattr__(name: str) -> Any:
    """``FORMS`` (every registered form, by name), ``PROJECTIONS``, ``Form``, ``FitResult``:
    the form modules are imported and registered on the first access."""
    if name in _LAZY:
        _load()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def get_form(name: str) -> Form:
    """The registered form called ``name``; ``ConfigError`` naming the known forms otherwise."""
    forms = _load()
    try:
        return forms[name]
    except (KeyError, TypeError):  # TypeError: an unhashable name
        raise ConfigError(f"form must be one of {', '.join(map(repr, forms))}, got {name!r}") from None


def register_form(form: Form) -> Form:
    """Add ``form`` (an instance of a :class:`~.base.Form` subclass) to the registry, so that
    ``CompressionConfig(form=form.name)``, :func:`moecore.compress`, saving, loading (in this
    process) and :func:`moecore.statistics` use it; returns it.  ``ConfigError`` if its name is
    empty or already taken by another form, or if two forms would store a tensor under the same name."""
    forms = _load()
    base = importlib.import_module(f"{__name__}.base")
    if not isinstance(form, base.Form) or not isinstance(form.name, str) or not form.name.isidentifier():
        raise ConfigError(f"register_form needs a Form instance with an identifier for a name, got {form!r}")
    with _lock:
        if forms.get(form.name) is form:
            return form
        if form.name in forms:
            raise ConfigError(f"a form named {form.name!r} is already registered")
        taken = {stem for other in forms.values() for stem in other.factor_names}
        clash = sorted(taken.intersection(form.factor_names))
        if clash or len(set(form.factor_names)) != len(form.factor_names) or "core" in form.factor_names:
            raise ConfigError(f"form {form.name!r}: factor names {clash or list(form.factor_names)} are taken")
        importlib.import_module("moecore.maths.budget").register_form(form)
        forms[form.name] = form
    return form


def unregister_form(name: str) -> None:
    """Remove a form added with :func:`register_form` (the forms of this package stay)."""
    if name in FORM_NAMES:
        raise ConfigError(f"form {name!r} is one of moecore's own and can't be removed")
    with _lock:
        _load().pop(name, None)
        importlib.import_module("moecore.maths.budget").unregister_form(name)


def quantizable_forms() -> tuple[str, ...]:
    """Names of the forms :mod:`moecore.quant` can store (:attr:`Form.quantizable`)."""
    return tuple(name for name, form in _load().items() if form.quantizable)


__all__ = ["CHECKPOINT_FORM", "DEFAULT_FORM", "FORMS", "FORM_NAMES", "PROJECTIONS", "FitResult", "Form", "get_form", "quantizable_forms",
           "register_form", "unregister_form"]
