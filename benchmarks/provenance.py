"""What produced a recorded number: the code's commit (and whether the tree had uncommitted
changes), the library versions and the configuration.  Every benchmark script that writes
JSON stores ``provenance(...)`` under ``meta["provenance"]``, so a row in RESULTS.md can be
traced to the exact code and settings that measured it (and re-run with
``benchmarks/check_results.py``).
"""
from __future__ import annotations

import json
import platform
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

#: distributions whose versions can move a recorded number
PACKAGES = ("moecore", "torch", "transformers", "accelerate", "safetensors", "tokenizers", "hqq", "lm_eval",
            "numpy", "torchao", "optimum-quanto")


def _git(*args: str, cwd: Path) -> str | None:
    try:
        r = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.rstrip("\n") if r.returncode == 0 else None  # keep porcelain's leading status column


def git_state(path: Path | None = None) -> dict[str, Any]:
    """``{"commit", "dirty", "changed"}`` of the checkout holding ``path`` (default: this
    repository; the code actually imported may be elsewhere, see :func:`code_path`).
    ``dirty`` is True when tracked files differ from the commit; ``changed`` lists up to 20
    of them. ``commit`` is None outside a git checkout (e.g. an exported tree)."""
    cwd = Path(path) if path is not None else REPO
    cwd = cwd if cwd.is_dir() else cwd.parent
    commit = _git("rev-parse", "HEAD", cwd=cwd)
    commit = commit.strip() if commit else None
    if commit is None:
        return {"commit": None, "dirty": None, "changed": []}
    status = _git("status", "--porcelain", "--untracked-files=no", cwd=cwd) or ""
    changed = [line[3:] for line in status.splitlines() if line.strip()]
    return {"commit": commit, "dirty": bool(changed), "changed": changed[:20]}


def code_path() -> str:
    """Where the imported ``moecore`` package lives (PYTHONPATH may point at another tree)."""
    import moecore

    return str(Path(moecore.__file__).resolve().parent)


def versions() -> dict[str, str | None]:
    """Installed versions of :data:`PACKAGES` (None when absent), torch's full version string
    (it carries the +cpu / +cuXXX build) and Python's."""
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    try:
        import torch

        out["torch"] = torch.__version__
    except ImportError:
        pass
    out["python"] = platform.python_version()
    return out


def provenance(config: Any = None, argv: list[str] | None = None, code: str | Path | None = None) -> dict[str, Any]:
    """``{"git", "code", "versions", "argv", "config"}`` for a results JSON's ``meta``.

    ``git`` describes the checkout the imported moecore comes from (falling back to this
    script's repository), so a run with ``PYTHONPATH=/tmp/old/src`` names the old tree.
    ``code`` names the moecore package directory when it is not the imported one (a script
    that runs others on this checkout's ``src/``)."""
    code = str(code) if code is not None else code_path()
    state = git_state(Path(code))
    if state["commit"] is None:
        state = {**git_state(REPO), "note": f"moecore imported from {code}, outside a git checkout"}
    config = json.loads(json.dumps(config, default=str))  # paths, dtypes... as strings: the JSON must write
    return {"git": state, "code": code, "versions": versions(), "argv": list(sys.argv if argv is None else argv),
            "config": config}


def set_overrides(items: list[str] | None) -> dict[str, Any]:
    """``--set KEY=VALUE`` items as ``CompressionConfig`` keyword arguments: each value parsed
    as JSON where it parses (numbers, ``true``, lists), else kept as a string."""
    extra: dict[str, Any] = {}
    for item in items or []:
        key, _, value = item.partition("=")
        try:
            extra[key] = json.loads(value)
        except json.JSONDecodeError:
            extra[key] = value
    return extra
