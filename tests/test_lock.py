"""The committed lock (``requirements/lock.txt``) and ``pyproject.toml`` agree.

``make`` installs exactly the lock, so CI never meets an upstream release nobody tested; the
ranges in ``pyproject.toml`` are what users of ``pip install moecore`` get.  The two must not
drift apart: every requirement of the core and of the extras ``make`` installs is locked, at a
version inside its range, and the installed environment is the locked one.
"""
from __future__ import annotations

import importlib.metadata
import os
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "lock.txt"
LOCK_IN = ROOT / "requirements" / "lock.in"
EXTRAS = ("all", "test", "eval", "plot", "train")  # what `make` installs (bench is not locked)


def locked() -> dict[str, Version]:
    """``{canonical name: version}`` of every ``name==version`` line of the lock."""
    pins = {}
    for line in LOCK.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)", line)
        if m:
            pins[canonicalize_name(m.group(1))] = Version(m.group(2))
    return pins


def declared() -> list[Requirement]:
    """The core and extra requirements of ``pyproject.toml`` (self-references left out)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in EXTRAS:
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return [r for r in reqs if canonicalize_name(r.name) != "moecore"]


def test_every_requirement_is_locked_inside_its_range():
    pins = locked()
    assert len(pins) > 50, "the lock looks truncated"
    for req in declared():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is required by pyproject.toml but missing from {LOCK.name}; run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"{LOCK.name} pins {req.name}=={pins[name]}, outside pyproject.toml's range '{req.specifier}'; "
            "run `make lock` (then the whole suite) or fix the range")


def test_lower_bounds_are_the_tested_versions():
    """A lower bound is a version the suite has passed on: no lower than the locked one's release."""
    pins = locked()
    for req in declared():
        floors = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=")]
        assert floors, f"{req.name} has no lower bound in pyproject.toml"
        pinned = pins[canonicalize_name(req.name)]
        assert max(floors).release <= pinned.release


def test_lock_input_pins_the_cpu_torch():
    pins = locked()
    torch_pin = re.search(r"^torch==(\S+)", LOCK_IN.read_text(), re.M)
    assert torch_pin, f"{LOCK_IN.name} must pin torch (a bare torch pulls a CUDA build)"
    assert pins["torch"].public == Version(torch_pin.group(1)).public


def test_lock_fails_a_version_outside_its_range():
    """The check above can fail: a pin outside its range is reported."""
    req = Requirement("transformers>=5.25,<6")
    assert not req.specifier.contains(Version("6.0.0"), prereleases=True)
    assert not req.specifier.contains(Version("5.24.0"), prereleases=True)


@pytest.mark.skipif(bool(os.environ.get("MOECORE_UNLOCKED")), reason="`make test-latest` runs off the lock")
@pytest.mark.parametrize("name", ["torch", "transformers", "accelerate", "safetensors", "lm-eval", "hqq"])
def test_installed_environment_is_the_lock(name):
    """``make`` installed the lock: the running environment has the locked versions."""
    installed = Version(importlib.metadata.version(name))
    assert installed == locked()[canonicalize_name(name)], (
        f"{name} {installed} is installed but the lock says {locked()[canonicalize_name(name)]}; "
        "reinstall with `make clean venv`")
