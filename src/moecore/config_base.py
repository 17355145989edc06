"""What every moecore configuration shares (:class:`ConfigBase`): validation from the field
types and metadata, ``to_dict`` / ``from_dict`` with a format version, and JSON files saved
beside a verb's output (``moecore_config.json``, ``distill_config.json``,
``recovery_config.json``).

Field metadata understood here (and by :mod:`moecore.cli._config_args`, which derives the
command-line flags from the same fields):

- ``choices``: the allowed values (``also``: a predicate accepting more, e.g. forms registered at run time);
- ``min`` / ``gt`` / ``max``: inclusive / exclusive lower bound, inclusive upper bound of a number;
- ``help``: the flag's help text (default: the field's entry in the class docstring's
  ``Attributes:`` section);
- ``flag`` / ``aliases``: the flag's name (default ``--field-name``) and extra names;
- ``same_output``: the field decides only how the work is done, never its result (memory
  limits tested to give the same bytes); :meth:`ConfigBase.output_dict` leaves it out, so a
  resume may change it.

Format versions: every dict and file carries ``format_version``.  A reader accepts its own
version and older ones (a dict without the key is version 1) and refuses a newer one with a
:class:`~moecore.errors.ConfigError` that says to upgrade moecore.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, ClassVar

from .errors import ConfigError
from .io_utils import atomic_write_text, user_path
from .version import __version__

FORMAT_KEY = "format_version"
VERSION_KEY = "moecore_version"


def is_int(x: Any) -> bool:
    """An ``int`` that is not a ``bool``."""
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x: Any) -> bool:
    """An ``int`` or ``float`` that is not a ``bool``."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _no(_value: Any) -> bool:
    return False


def unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """``int | None`` -> ``(int, True)``; ``int`` -> ``(int, False)``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def field_types(cls: type) -> dict[str, Any]:
    """``{field name: resolved type}`` of a dataclass (string annotations evaluated)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


_ATTR = re.compile(r"^(\s+)(\w+):\s*(.*)$")


def field_docs(cls: type) -> dict[str, str]:
    """``{field name: text}`` from the ``Attributes:`` section of the class docstring (one
    ``name: text`` entry per field, continuation lines indented deeper), reST markup removed."""
    lines = (cls.__doc__ or "").splitlines()
    out: dict[str, list[str]] = {}
    inside, indent, name = False, None, None
    for line in lines:
        if line.strip() == "Attributes:":
            inside = True
            continue
        if not inside:
            continue
        m = _ATTR.match(line)
        if m and (indent is None or len(m.group(1)) == indent):
            indent, name = len(m.group(1)), m.group(2)
            out[name] = [m.group(3)]
        elif name and line.strip() and indent is not None and len(line) - len(line.lstrip()) > indent:
            out[name].append(line.strip())
        elif line.strip():
            break
    return {k: re.sub(r"``|:class:`~?|:func:`~?|:mod:`~?|`", "", " ".join(v)) for k, v in out.items()}


def _check_type(name: str, value: Any, tp: Any) -> Any:
    """``value`` checked against ``tp`` (and converted: an int for a float field becomes a float)."""
    base, optional = unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name} must not be None")
    if base is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
    elif base is int:
        if not is_int(value):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
    elif base is float:
        if not is_number(value):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        if not math.isfinite(value):  # NaN passes every `v < min` check: refuse it here
            raise ConfigError(f"{name} must be a finite number, got {value!r}")
        return float(value)
    elif base is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
    elif typing.get_origin(base) is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{name} must be a list of strings, got {value!r}")
        return list(value)
    return value


class ConfigBase:
    """Mixin of the configuration dataclasses; subclasses set ``FILENAME``, ``KIND`` and
    ``FORMAT_VERSION`` and call :meth:`check_fields` first in ``__post_init__``."""

    FILENAME: ClassVar[str] = ""
    KIND: ClassVar[str] = "config"   # used in messages: "compression config", "distill config"
    FORMAT_VERSION: ClassVar[int] = 1

    def check_fields(self) -> None:
        """Validate every field from its type and its metadata (``choices``, ``min``, ``gt``, ``max``)."""
        types_ = field_types(type(self))
        for f in dataclasses.fields(self):
            v = _check_type(f.name, getattr(self, f.name), types_[f.name])
            meta = f.metadata
            if v is not None and "choices" in meta and v not in meta["choices"] and not meta.get("also", _no)(v):
                raise ConfigError(f"{f.name} must be one of {', '.join(map(repr, meta['choices']))}, got {v!r}")
            if v is not None and "min" in meta and v < meta["min"]:
                raise ConfigError(f"{f.name} must be >= {meta['min']}, got {v!r}")
            if v is not None and "gt" in meta and v <= meta["gt"]:
                raise ConfigError(f"{f.name} must be > {meta['gt']}, got {v!r}")
            if v is not None and "max" in meta and v > meta["max"]:
                raise ConfigError(f"{f.name} must be <= {meta['max']}, got {v!r}")
            setattr(self, f.name, v)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every field, plus ``format_version``."""
        return {FORMAT_KEY: self.FORMAT_VERSION, **dataclasses.asdict(self)}

    def output_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` without the fields whose metadata says ``same_output``: what decides
        the result (a streamed run's fingerprint)."""
        skip = {f.name for f in dataclasses.fields(self) if f.metadata.get("same_output")}
        return {k: v for k, v in self.to_dict().items() if k not in skip}

    @classmethod
    def upgrade(cls, data: dict[str, Any], version: int) -> dict[str, Any]:
        """Turn the fields of an older ``version`` into the current ones (no change so far)."""
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """Build (and validate) a config from :meth:`to_dict` output or a saved file's content.
        Unknown keys are an error; ``moecore_version`` is ignored; a ``format_version`` newer than
        this moecore reads is refused (a missing one means 1)."""
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.KIND} must be a dict, got {type(data).__name__}")
        data = dict(data)
        data.pop(VERSION_KEY, None)
        version = data.pop(FORMAT_KEY, 1)
        if not is_int(version) or version < 1:
            raise ConfigError(f"{cls.KIND} has an invalid {FORMAT_KEY}: {version!r}")
        if version > cls.FORMAT_VERSION:
            raise ConfigError(f"{cls.KIND} is in format version {version}, newer than this moecore "
                              f"({__version__}) reads (up to {cls.FORMAT_VERSION}): upgrade moecore")
        data = cls.upgrade(data, version)
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"unknown {cls.KIND} key(s): {', '.join(unknown)}")
        return cls(**data)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``FILENAME`` (this config + ``moecore_version``) atomically into ``directory``
        and return its path."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        payload = {VERSION_KEY: __version__, **self.to_dict()}
        atomic_write_text(d / self.FILENAME, json.dumps(payload, indent=2, sort_keys=True) + "\n")
        return d / self.FILENAME

    @classmethod
    def load(cls, path: str | os.PathLike):
        """Read ``FILENAME`` from the folder ``path`` (or the file ``path`` itself)."""
        p = Path(path)
        if p.is_dir():
            p = p / cls.FILENAME
        if not p.is_file():
            raise ConfigError(f"no {cls.FILENAME} at {p}")
        with user_path(p, "read"):
            text = p.read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{p} is not valid JSON: {exc}") from exc
        return cls.from_dict(data)

    def changes(self, other) -> dict[str, tuple[Any, Any]]:
        """``{field: (other's value, this value)}`` for every field that differs from ``other``."""
        a, b = other.to_dict(), self.to_dict()
        return {k: (a.get(k), b[k]) for k in b if k != FORMAT_KEY and a.get(k) != b[k]}
