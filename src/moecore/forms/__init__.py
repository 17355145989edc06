"""The forms of the compressed experts, by name: ``get_form("delta")``, ``FORMS``.

Every module of this package other than :mod:`.base` defines one :class:`~.base.Form` as
its module-level ``FORM`` and is registered here on import (sorted by module name), so
adding a form means adding one file.  The registry also makes the forms known by name to
:mod:`moecore.maths.budget` (which, being pure maths, does not import this package).
"""
from __future__ import annotations

import importlib
import pkgutil

from ..errors import ConfigError
from ..maths import budget
from .base import PROJECTIONS, FitResult, Form

#: the form of :class:`moecore.CompressionConfig` and of a checkpoint that names none
DEFAULT_FORM = "delta"


def _discover() -> dict[str, Form]:
    """``{name: Form}`` of every form module of this package."""
    found: dict[str, Form] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name == "base" or info.name.startswith("_"):
            continue
        form = getattr(importlib.import_module(f"{__name__}.{info.name}"), "FORM", None)
        if not isinstance(form, Form) or not form.name or form.name in found:
            raise TypeError(f"{__name__}.{info.name} must define FORM, a Form with a new name")
        found[form.name] = form
    return found


#: every registered form, by name
FORMS: dict[str, Form] = _discover()
for _form in FORMS.values():
    budget.register_form(_form)


def get_form(name: str) -> Form:
    """The registered form called ``name``; ``ConfigError`` naming the known forms otherwise."""
    try:
        return FORMS[name]
    except (KeyError, TypeError):  # TypeError: an unhashable name
        raise ConfigError(f"form must be one of {', '.join(map(repr, FORMS))}, got {name!r}") from None


def quantizable_forms() -> tuple[str, ...]:
    """Names of the forms :mod:`moecore.quant` can store (:attr:`Form.quantizable`)."""
    return tuple(name for name, form in FORMS.items() if form.quantizable)


__all__ = ["DEFAULT_FORM", "FORMS", "PROJECTIONS", "FitResult", "Form", "get_form", "quantizable_forms"]
