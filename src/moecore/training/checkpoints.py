"""Checkpoint directories: complete only after an atomic rename.

A checkpoint is first written to ``OUT/.tmp-checkpoint-N`` (model in moecore's compressed
format, optimizer / scheduler / RNG / trainer state by the Trainer's own mechanism), then
renamed to ``OUT/checkpoint-N``. A directory named ``checkpoint-N`` is therefore always
complete; a kill mid-save leaves only a ``.tmp-`` directory, which is ignored and cleaned.
"""
from __future__ import annotations

import re
from pathlib import Path

from ..io_utils import publish_dir, remove_tree

PREFIX = "checkpoint"
TMP_PREFIX = ".tmp-checkpoint"
_RE = re.compile(rf"^{PREFIX}-(\d+)$")
# files a complete checkpoint must hold (besides the weights)
REQUIRED = ("config.json", "trainer_state.json")


def step_of(path: str | Path) -> int | None:
    """The step of a ``checkpoint-N`` directory, else None."""
    m = _RE.match(Path(path).name)
    return int(m.group(1)) if m else None


def is_complete(path: str | Path) -> bool:
    """True for a ``checkpoint-N`` directory holding config, trainer state and safetensors weights."""
    p = Path(path)
    return (step_of(p) is not None and p.is_dir() and all((p / f).is_file() for f in REQUIRED)
            and any(p.glob("*.safetensors")))


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints under ``output_dir``, sorted by step."""
    d = Path(output_dir)
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if is_complete(p)]
    return sorted(found, key=lambda p: step_of(p))


def last_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def staging_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"{TMP_PREFIX}-{step}"


def clean_staging(output_dir: str | Path) -> None:
    """Remove half-written ``.tmp-checkpoint-*`` directories (left by a kill)."""
    d = Path(output_dir)
    if d.is_dir():
        for p in d.glob(f"{TMP_PREFIX}-*"):
            remove_tree(p)


def publish(tmp: str | Path, final: str | Path) -> Path:
    """Make a fully written staging directory appear as ``final`` (fsync'd first); an existing
    ``final`` (same step, from an earlier run) is swapped out atomically and removed
    (:func:`moecore.io_utils.publish_dir`)."""
    return publish_dir(tmp, final, overwrite=True)


def rotate(output_dir: str | Path, keep: int | None) -> None:
    """Delete the oldest complete checkpoints so that at most ``keep`` remain."""
    if not keep or keep <= 0:
        return
    for p in complete_checkpoints(output_dir)[:-keep]:
        remove_tree(p)
