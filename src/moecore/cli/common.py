"""Helpers every verb of the command line shares: dtype and device flags, SIGTERM as an
interrupt.  (Flags derived from a config are :mod:`._config_args`'; the argument specs,
torch-free, are :mod:`.commands`'.)"""
from __future__ import annotations

import contextlib
import signal
from pathlib import Path

import torch

from moecore.checkpoint_reader import read_config
from moecore.errors import ConfigError
from moecore.families import config_dtype
from moecore.planning import free_gpu_bytes


def torch_dtype(name: str | None):
    """``"auto"``/``None`` -> ``"auto"``; else the ``torch.dtype`` of that name."""
    if name in (None, "auto"):
        return "auto"
    return getattr(torch, name)


def resolve_device(name: str) -> torch.device:
    """``--device``: ``auto`` (cuda if available, else cpu) or a torch device string; a malformed
    or unavailable device is a ``ConfigError``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"--device {name}: not a device (auto, cpu, cuda, cuda:1, ...)") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: there are {torch.cuda.device_count()} CUDA device(s)")
    return dev


def placement(model_dir, device: torch.device, dtype, headroom: float = 0.9) -> dict:
    """``from_pretrained`` keyword arguments that place a model for inference: ``{}`` when it
    fits ``device`` (the caller then moves it there), ``{"device_map": "auto"}`` when
    ``device`` is a CUDA device whose free memory (times ``headroom``) is below the model's
    weights at ``dtype``: accelerate then spreads the layers over every GPU and, past them,
    host memory.  The weights' size is the safetensors files' (scaled from the dtype
    ``config.json`` records to ``dtype``)."""
    if device.type != "cuda":
        return {}
    stored = config_dtype(read_config(Path(model_dir)))
    target = stored if dtype in (None, "auto") else dtype
    size = sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))
    need = size * torch.empty(0, dtype=target).element_size() / torch.empty(0, dtype=stored).element_size()
    free = free_gpu_bytes(device)
    return {} if need <= headroom * free else {"device_map": "auto"}


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Within the block SIGTERM (``kill PID``, a batch scheduler's stop) raises
    ``KeyboardInterrupt`` like Ctrl-C does, so the run stops between two Python steps and says
    what it kept.  Yields a list that holds the signal number once one arrived."""
    got: list[int] = []

    def handler(signum, frame):
        got.append(signum)
        raise KeyboardInterrupt

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave SIGTERM alone
        yield got
        return
    try:
        yield got
    finally:
        signal.signal(signal.SIGTERM, old)
