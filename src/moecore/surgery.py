"""Module surgery: finding the decoder-layer stack and swapping submodules.

Every module swap in moecore (compressing, loading a checkpoint, planning on the meta
device) goes through :func:`replace_module`, so there is one way to do it.
"""
from __future__ import annotations

from torch import nn

from .errors import UnsupportedModelError


def replace_module(root: nn.Module, path: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at ``path`` (dotted, relative to ``root``) and return the module it replaced."""
    parent_name, _, leaf = path.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    old = getattr(parent, leaf)
    setattr(parent, leaf, new)
    return old


def set_tensor(root: nn.Module, name: str, value) -> None:
    """Put the tensor ``value`` at the parameter or buffer ``name`` (dotted, relative to
    ``root``): a parameter keeps its ``nn.Parameter`` object (``.data`` replaced), a buffer is
    replaced."""
    owner, _, leaf = name.rpartition(".")
    mod = root.get_submodule(owner) if owner else root
    if leaf in mod._parameters:
        mod._parameters[leaf].data = value
    else:
        mod._buffers[leaf] = value


def decoder_layers(model: nn.Module, inside: str) -> tuple[str, nn.ModuleList]:
    """``(path, ModuleList)`` of the decoder-layer stack that holds the module at ``inside``
    (e.g. ``"model.layers"`` for ``"model.layers.3.mlp.experts"``)."""
    parts = inside.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        if parts[cut].isdigit():
            path = ".".join(parts[:cut])
            stack = model.get_submodule(path)
            if isinstance(stack, nn.ModuleList):
                return path, stack
    raise UnsupportedModelError(f"{inside} is not inside a list of decoder layers (e.g. model.layers.N); "
                                f"moecore's layer engine needs one")
