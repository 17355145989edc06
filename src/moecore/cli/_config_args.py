"""Command-line flags derived from a configuration dataclass (:mod:`moecore.config_base`).

:func:`add_config_args` adds one flag per field: ``--field-name`` (or the field's ``flag``
metadata, plus its ``aliases``), typed from the annotation (``int``, ``float``, ``str``,
``bool`` as an on/off switch, ``list[str]`` as a comma-separated value), with the help text of
the field's ``help`` metadata or docstring entry and its default: every flag's help ends with
``(default: ...)`` (``off`` / ``on`` for a switch; a field's ``unset`` metadata says what a
``None`` default means, else ``none``).  Flags the user
does not give stay unset, so :func:`config_from_args` passes only the given ones and every
default lives in the dataclass.  Values are validated by the dataclass itself: a bad value is
a :class:`~moecore.errors.ConfigError`, one line from the CLI.

A field whose type is another config dataclass (``CompressionConfig.quant``) gets that
class's flags in their own group; the nested config is built only when one of its flags is
given, and its optional fields that are not given are ``None`` (``--core-bits 4`` alone stores
the core in 4 bits and keeps the factors in float).
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Iterable

from moecore.config_base import field_docs, field_types, unwrap_optional


def _fields(cls: type, only: Iterable[str] | None) -> list[dataclasses.Field]:
    fields = dataclasses.fields(cls)
    if only is None:
        return list(fields)
    names = {f.name for f in fields}
    unknown = set(only) - names
    if unknown:
        raise AttributeError(f"{cls.__name__} has no field(s) {sorted(unknown)}")
    return [f for f in fields if f.name in set(only)]


def _summary(text: str, min_chars: int = 100) -> str:
    """The leading sentences of ``text``, as few as make ``min_chars`` characters."""
    text = " ".join(text.split())
    for i in range(min_chars, len(text) - 1):
        if text[i] == "." and text[i + 1] == " " and not text[max(0, i - 3):i].endswith(("e.g", "i.e")):
            return text[:i + 1]
    return text


def _plain(text: str) -> str:
    """reST markup of a docstring removed for ``--help``."""
    for mark in ("``", ":mod:", ":class:", ":func:", "`"):
        text = text.replace(mark, "")
    return text


def default_text(f: dataclasses.Field, base: Any, nested_optional: bool) -> str:
    """``"(default: ...)"`` for the flag of field ``f``."""
    default = f.default if f.default is not dataclasses.MISSING else None
    if base is bool:
        return f"(default: {'on' if default else 'off'})"
    if default is None or nested_optional:
        return f"(default: {f.metadata.get('unset', 'none')})"
    return f"(default: {default})"


def _comma_list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _title(cls: type) -> str:
    """The first line of the class docstring, reST markup removed."""
    return _plain((cls.__doc__ or cls.__name__).strip().splitlines()[0].rstrip("."))


def _add_flag(group, f: dataclasses.Field, tp: Any, doc: str, dest: str, nested: bool) -> None:
    meta = f.metadata
    base, optional = unwrap_optional(tp)
    flags = [meta.get("flag") or "--" + f.name.replace("_", "-"), *meta.get("aliases", ())]
    default = f.default if f.default is not dataclasses.MISSING else None
    text = _plain(meta.get("help") or _summary(doc))
    kw: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS}
    if base is bool:
        kw["action"] = argparse.BooleanOptionalAction if default else "store_true"
    elif typing.get_origin(base) is list:
        kw.update(type=_comma_list, metavar="A,B,...")
    else:
        kw["type"] = base
        kw["metavar"] = flags[0].lstrip("-").replace("-", "_").upper()  # --quant-group QUANT_GROUP
        if "choices" in meta:  # validated by the dataclass (one-line ConfigError), shown here
            kw["metavar"] = "{" + ",".join(map(str, meta["choices"])) + "}"
    text += " " + default_text(f, base, nested and optional)
    group.add_argument(*flags, help=text.replace("%", "%%"), **kw)


def add_config_args(parser: argparse.ArgumentParser, cls: type, *, only: Iterable[str] | None = None,
                    title: str | None = None, group=None) -> None:
    """Add a flag for every field of the dataclass ``cls`` (or those named in ``only``) to
    ``parser``, in an argument group (``title``, default: the first line of ``cls``'s
    docstring; or ``group``, an existing one, which also takes a nested config's flags).
    Build the config back with :func:`config_from_args` and the same ``only`` (or none:
    unset flags are skipped)."""
    _add(parser, cls, only, title, prefix="", group=group)


def _add(parser, cls, only, title, prefix: str, group=None) -> None:
    shared = group
    group = group or parser.add_argument_group(title or _title(cls))
    docs, types_ = field_docs(cls), field_types(cls)
    for f in _fields(cls, only):
        base, _ = unwrap_optional(types_[f.name])
        if dataclasses.is_dataclass(base):
            _add(parser, base, None, None, prefix=f"{prefix}{f.name}.", group=shared)
        else:
            _add_flag(group, f, types_[f.name], docs.get(f.name, ""), prefix + f.name, nested=bool(prefix))


def _given(cls: type, args: argparse.Namespace, only, prefix: str = "") -> dict[str, Any]:
    kw: dict[str, Any] = {}
    types_ = field_types(cls)
    for f in _fields(cls, only):
        base, _ = unwrap_optional(types_[f.name])
        if dataclasses.is_dataclass(base):
            sub = _given(base, args, None, prefix=f"{prefix}{f.name}.")
            if sub:
                sub_types = field_types(base)
                for g in dataclasses.fields(base):
                    if g.name not in sub and unwrap_optional(sub_types[g.name])[1]:
                        sub[g.name] = None
                kw[f.name] = sub
        elif hasattr(args, prefix + f.name):
            kw[f.name] = getattr(args, prefix + f.name)
    return kw


def config_from_args(cls: type, args: argparse.Namespace, *, only: Iterable[str] | None = None,
                     none_if_unset: bool = False, **overrides: Any):
    """The ``cls`` config from the flags :func:`add_config_args` added (given flags only; the
    rest keep the dataclass defaults), with ``overrides`` on top.  ``none_if_unset``: ``None``
    when no flag of ``cls`` was given.  Raises :class:`~moecore.errors.ConfigError` for bad values."""
    kw = _given(cls, args, only)
    if none_if_unset and not kw:
        return None
    return cls(**{**kw, **overrides})
