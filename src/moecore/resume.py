"""The resumable work folder of a streamed compression (``.OUT.partial`` beside ``OUT``).

The folder holds the finished layers' shards, the calibration activations of the last
finished layer and a state file (``moecore_resume.json``).  The state records a
:class:`Fingerprint` of the job: one digest over everything that decides the output (the
check older moecore versions made) and, since this version, each component on its own
(``fingerprint_parts``: the model's ``config.json``, its weight files, the compression
config, the calibration tokens, dtype, device type, moecore version), so a refused
``--resume`` names what differs.  :func:`resume_hint` is the line an interrupted run prints.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # not POSIX: no OS lock
    fcntl = None

from .errors import CheckpointError
from .io_utils import atomic_write_text, remove_tree, say
from .progress import progress_bar

STATE = "moecore_resume.json"

#: the fingerprint's components, in the order a refusal names them, with their names in words
PART_NAMES = {"model_config": "the model's config.json", "weights": "the model's weight files",
              "compression_config": "the compression config", "calibration": "the calibration tokens",
              "dtype": "the dtype", "device": "the device type", "version": "the moecore version"}


class Fingerprint(str):
    """The job's combined digest (a ``str``, as stored by every moecore version) carrying its
    components in :attr:`parts` (``{name: digest or value}``, names of :data:`PART_NAMES`)."""

    parts: dict[str, Any]

    def __new__(cls, digest: str, parts: dict[str, Any] | None = None) -> "Fingerprint":
        obj = super().__new__(cls, digest)
        obj.parts = dict(parts or {})
        return obj


def partial_dir(out: Path) -> Path:
    """The resumable work folder of output ``out``: ``.OUT.partial`` beside it."""
    return out.parent / f".{out.name}.partial"


class WorkLock:
    """The OS lock (``flock``) of a work folder: one writer per output.  The kernel releases it
    when the holding process dies, so a killed run never leaves a stale lock, and a second
    run on the same output fails at once with one line instead of deleting (``--overwrite``)
    or writing into the folder of a live run.  A no-op where ``fcntl`` is missing."""

    def __init__(self):
        self.fd: int | None = None

    def hold(self, work: Path) -> None:
        """Hold the lock of ``work`` if it exists (again, if it was replaced since): raise
        ``CheckpointError`` if another live process holds it."""
        if fcntl is None or not work.is_dir():
            return
        if self.fd is not None:
            if os.fstat(self.fd).st_ino == os.stat(work).st_ino:
                return
            self.release()
        fd = os.open(work, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CheckpointError(f"{work} is in use by another moecore run (it holds the folder's lock): wait for "
                                  f"that run to end, or stop it, then rerun") from None
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None

    def __enter__(self) -> "WorkLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def write_state(work: Path, state: dict[str, Any]) -> None:
    atomic_write_text(work / STATE, json.dumps(state, indent=2, sort_keys=True) + "\n")


def _show(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:12] + "..."


def differences(old: dict[str, Any], fp: Fingerprint) -> list[str]:
    """What differs between a stored state's fingerprint components and ``fp``'s, in words
    (``"the compression config (rank: 8 there, 4 here)"``); empty when the stored state has no
    components (written by an older moecore) or they all agree."""
    stored = old.get("fingerprint_parts")
    if not isinstance(stored, dict) or not getattr(fp, "parts", None):
        return []
    out = []
    for key, name in PART_NAMES.items():
        a, b = stored.get(key), fp.parts.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):  # the compression config: name its fields
            fields = [f"{k}: {_show(a.get(k))} there, {_show(b.get(k))} here"
                      for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            out.append(f"{name} ({'; '.join(fields)})")
        elif key in ("dtype", "device", "version"):
            out.append(f"{name} ({_show(a)} there, {_show(b)} here)")
        else:
            out.append(name)
    return out


def read_state(work: Path, fp: str, resume: bool, overwrite: bool) -> dict[str, Any]:
    """The resume state of ``work`` (continuing an interrupted run) or a fresh one.

    An interrupted run's folder is continued only with ``resume`` and only if its fingerprint
    matches; without ``resume`` it is an error (or, with ``overwrite``, discarded), so an
    hour of finished layers is never dropped silently.  A refusal names the components of the
    fingerprint that differ (when the folder's state records them)."""

    if work.exists():
        try:
            old = json.loads((work / STATE).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            old = None
        done = old.get("done", 0) if isinstance(old, dict) else 0
        if resume and isinstance(old, dict) and old.get("fingerprint") == fp:
            say(f"resuming in {work}: {done} layer(s) already done")
            return old
        if resume and not overwrite:
            diff = differences(old, fp) if isinstance(old, dict) else []
            what = ("; ".join(diff) + (" differs" if len(diff) == 1 else " differ")) if diff else \
                "model, config, calibration, dtype, device or moecore version differ"
            raise CheckpointError(f"cannot resume from {work}: it belongs to a different job ({what}); "
                                  f"rerun with the same arguments, or remove it or pass --overwrite")
        if not overwrite:
            raise CheckpointError(f"{work} holds an unfinished compression ({done} layer(s) done): pass --resume to "
                                  f"continue it or --overwrite to start over")
        say(f"discarding the unfinished compression in {work} ({done} layer(s) done)")
        remove_tree(work, ignore_errors=False)
    elif resume:
        say(f"nothing to resume in {work}; starting from the first layer")
    work.parent.mkdir(parents=True, exist_ok=True)
    os.mkdir(work)  # 0o777 & ~umask
    state: dict[str, Any] = {"fingerprint": str(fp), "done": 0, "activations": None}
    if getattr(fp, "parts", None):
        state["fingerprint_parts"] = fp.parts
    write_state(work, state)
    return state


def resume_hint(out: str | os.PathLike) -> str:
    """The line an interrupted ``moecore compress -o OUT`` prints: how many layers its work
    folder keeps and how to continue (``"3 of 48 layers kept in .OUT.partial; rerun the same
    command with --resume"``)."""
    work = partial_dir(Path(out).expanduser().resolve())
    try:
        state = json.loads((work / STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "interrupted before the first layer: nothing was kept"
    done = state.get("done", 0) if isinstance(state, dict) else 0
    total = state.get("num_layers", "?") if isinstance(state, dict) else "?"
    return f"interrupted: {done} of {total} layers kept in {work}; rerun the same command with --resume"


def check_source(reader, work: Path, state: dict[str, Any], progress: bool) -> None:
    """Before a resume continues (``reader``: the run's
    :class:`~moecore.checkpoint_reader.CheckpointReader`): the source weights of every finished layer, and the
    non-layer tensors, still have the content hash recorded when they were read
    (:meth:`~moecore.checkpoint_reader.CheckpointReader.digest`); ``CheckpointError`` naming
    the first part that changed.  This reads the finished layers' weights once more: weights
    edited in place keep every name, size and header, which the fingerprint covers."""
    recorded = state.get("source", {})
    parts = [("rest", None)] + [(str(i), i) for i in range(state["done"])]
    parts = [(name, i) for name, i in parts if name in recorded]
    bar = progress_bar(total=len(parts), desc="checking the source weights", unit="part", enabled=progress,
                       leave=False)
    for name, i in parts:
        if reader.digest(reader.by_layer.get(i, [])) != recorded[name]:
            what = "the non-layer tensors (embeddings, head, norms)" if i is None else f"layer {i}"
            raise CheckpointError(f"cannot resume from {work}: the model's weights of {what} changed since the "
                                  f"interrupted run (their content hash differs); pass --overwrite to start over")
        bar.update(1)
    bar.close()


def published_state(out: str | os.PathLike) -> dict[str, Any] | None:
    """The state file a published model ``out`` still holds (its run was killed between
    publishing and removing that file), or ``None``."""
    try:
        state = json.loads((Path(out).expanduser() / STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and state.get("finished") else None


def tidy_published(out: Path, state: dict[str, Any], fp: Fingerprint, overwrite: bool) -> dict[str, Any] | None:
    """``--resume`` of a run killed after publishing (``state``: :func:`published_state`): the
    output is complete, so its leftover state file goes (if it is this job's) and nothing else
    is touched; the summary.  Another job's output is an error, or with ``overwrite`` ``None``
    (a fresh run replaces it)."""
    if state.get("fingerprint") != fp:
        if overwrite:
            return None
        raise CheckpointError(f"{out} was published by an interrupted run of a different job; pass --overwrite "
                              f"to replace it")
    (out / STATE).unlink()
    say(f"{out} was already published by the interrupted run: removed the state file it left")
    return {"output": str(out), "resumed_at_layer": state["done"], "timings": [], "recovery": [],
            "ranks": state["ranks"], "dtype": fp.parts.get("dtype"), "device": fp.parts.get("device")}
