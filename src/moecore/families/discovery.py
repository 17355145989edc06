"""Expert discovery: :func:`find_experts` (the one discovery function: original and/or
compressed experts of a model), :func:`is_compressed` (the one answer to "is it
compressed?"), :func:`layout_of`, :func:`top_k_of` and :func:`text_config`.

A module's layout is resolved in this order:

1. :data:`~moecore.families.layouts.UNSUPPORTED`: experts classes moecore knows it can't
   compress, with the reason;
2. :data:`~moecore.families.layouts.KNOWN_LAYOUTS`: experts classes registered by name
   (:func:`~moecore.families.layouts.register_layout`), with the per-model values (e.g. the
   SwiGLU clamp) read off the module;
3. the markers transformers' ``@use_experts_implementation`` sets on a class
   (``is_transposed``, ``is_concatenated``, ``has_bias``, ``has_gate``,
   ``has_post_expert_norm``, ``_apply_gate``): the layout its own grouped-GEMM kernels use;
4. the default fused layout (``gate_up_proj (E, 2F, H)`` with gate first, ``down_proj
   (E, H, F)``, ``act_fn(gate) * up``: Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3, ...).

Anything that looks like experts but fits no layout raises :class:`UnsupportedModelError`
naming the module: nothing is skipped silently.
"""
from __future__ import annotations

import dataclasses
from typing import Literal, NamedTuple

import torch
from torch import nn

from ..errors import UnsupportedModelError
from .activations import uses_act_fn
from .layouts import FUSED, KNOWN_LAYOUTS, UNSUPPORTED, ExpertsImplementationMarkers, ExpertsLayout, hidden_act_name


class FoundExperts(NamedTuple):
    """One experts module of a model: ``(path, module, layout)``."""

    path: str
    module: nn.Module
    layout: ExpertsLayout

    @property
    def compressed(self) -> bool:
        """True for a moecore-compressed experts module."""
        return is_compressed(self.module)


def _looks_like_experts(name: str, module: nn.Module) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "experts":
        return True
    gu, dn = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return isinstance(gu, nn.Parameter) and isinstance(dn, nn.Parameter) and gu.dim() == 3


def is_compressed(module: nn.Module, *, recurse: bool = False) -> bool:
    """True for a moecore experts module (``CompressedExperts`` and its subclasses carry the
    class attribute ``moecore_compressed``; checked by attribute so that this module does not
    import the module that imports it).  ``recurse=True``: ``module`` (e.g. a whole model)
    is or contains one."""
    if recurse:
        return any(is_compressed(m) for m in module.modules())
    return bool(getattr(type(module), "moecore_compressed", False))


def _marker_layout(name: str, module: nn.Module) -> ExpertsLayout:
    """The layout transformers' ``@use_experts_implementation`` markers describe (default
    gated activation only)."""
    cls = type(module).__name__
    if not module.has_gate:
        raise UnsupportedModelError(f"{name} ({cls}): experts without a gate projection (up -> act -> down) are not "
                                    f"supported; moecore compresses gated gate/up/down experts")
    if module.has_post_expert_norm:
        raise UnsupportedModelError(f"{name} ({cls}): experts with a norm after each expert (post-expert norm) are "
                                    f"not supported")
    apply_gate = getattr(type(module), "_apply_gate", None)
    if apply_gate is not None and getattr(apply_gate, "__name__", "") != "_default_apply_gate":
        raise UnsupportedModelError(
            f"{name} ({cls}) has a custom gated activation moecore does not know; describe it with "
            f"moecore.register_layout({cls!r}, ExpertsLayout(...)) (and moecore.families.register_activation)")
    flags = [n for n, on in (("transposed", module.is_transposed), ("interleaved", not module.is_concatenated),
                             ("bias", module.has_bias)) if on]
    return dataclasses.replace(
        FUSED, name="_".join(["fused", *flags]), transposed=bool(module.is_transposed),
        interleaved=not module.is_concatenated, hidden_act=hidden_act_name(module),
        gate_up_bias_attr="gate_up_proj_bias" if module.has_bias else None,
        down_bias_attr="down_proj_bias" if module.has_bias else None,
    )


def layout_of(name: str, module: nn.Module) -> ExpertsLayout:
    """The :class:`ExpertsLayout` of experts module ``module`` at path ``name`` (works on the
    meta device).  Raises :class:`UnsupportedModelError` naming ``name`` if moecore can't
    handle it."""
    cls = type(module).__name__
    if is_compressed(module):
        raise UnsupportedModelError(f"{name} is already compressed by moecore")
    if cls in UNSUPPORTED:
        raise UnsupportedModelError(f"{name} ({cls}) is not supported: {UNSUPPORTED[cls]}")
    if isinstance(module, (nn.ModuleList, nn.ModuleDict, nn.Sequential)):
        raise UnsupportedModelError(
            f"{name} ({cls}) stores its experts as a list of separate modules; moecore supports "
            f"only fused 3-D expert tensors (gate_up_proj / down_proj)"
        )
    if cls in KNOWN_LAYOUTS:
        layout = KNOWN_LAYOUTS[cls].resolve(module)
    elif isinstance(module, ExpertsImplementationMarkers):
        layout = _marker_layout(name, module)
    else:
        layout = dataclasses.replace(FUSED, hidden_act=hidden_act_name(module))
    if uses_act_fn(layout) and not callable(getattr(module, "act_fn", None)) and \
            (layout.hidden_act is None or layout.activation == "act_fn_pair"):
        raise UnsupportedModelError(f"{name} ({cls}) has no act_fn")
    if isinstance(module, ExpertsImplementationMarkers) and (
            bool(module.is_transposed) != layout.transposed or bool(module.is_concatenated) == layout.interleaved
            or bool(module.has_bias) != layout.has_bias):
        raise UnsupportedModelError(f"{name} ({cls}): its transformers markers disagree with the registered layout "
                                    f"{layout.name!r}")
    gu = getattr(module, layout.gate_up_attr, None)
    dn = getattr(module, layout.down_attr, None)
    if not isinstance(gu, torch.Tensor) or not isinstance(dn, torch.Tensor) or gu.dim() != 3 or dn.dim() != 3:
        raise UnsupportedModelError(
            f"{name} ({cls}) looks like an experts module but has no 3-D {layout.gate_up_attr!r} and "
            f"{layout.down_attr!r} parameters; moecore can't compress it"
        )
    views = layout.split(module)
    e, f, h = views["gate"].shape
    if gu.shape[1 + layout.transposed] % 2 or views["down"].shape != (e, h, f) or dn.shape[0] != e:
        raise UnsupportedModelError(
            f"{name} ({cls}) has unexpected expert shapes {tuple(gu.shape)} / {tuple(dn.shape)} for layout {layout.name!r}"
        )
    if layout.has_bias:
        bg, bd = views["bias_gate_up"], views["bias_down"]
        if tuple(bg.shape) != (e, 2 * f) or tuple(bd.shape) != (e, h):
            raise UnsupportedModelError(f"{name} ({cls}) has unexpected bias shapes {tuple(bg.shape)} / {tuple(bd.shape)}")
    return layout


def find_experts(model: nn.Module, which: Literal["original", "compressed", "all"] = "original", *,
                 required: bool = True) -> list[FoundExperts]:
    """The experts modules of ``model`` as :class:`FoundExperts` ``(path, module, layout)``,
    in model order: the one discovery function of moecore.

    Args:
        which: ``"original"`` (what ``compress`` works on; compressed ones are skipped),
            ``"compressed"`` (moecore's, with their recorded layout) or ``"all"``.
        required: raise :class:`UnsupportedModelError` when nothing is found ("not a
            Mixture-of-Experts model", "already compressed", "no compressed experts");
            otherwise return ``[]``.

    An original experts module whose layout moecore can't handle always raises
    :class:`UnsupportedModelError` naming it.
    """
    if which not in ("original", "compressed", "all"):
        raise ValueError(f"which must be 'original', 'compressed' or 'all', got {which!r}")
    found: list[FoundExperts] = []
    compressed = 0
    inside: str | None = None
    for name, module in model.named_modules():
        if inside is not None and name.startswith(inside + "."):
            continue  # children of an experts module
        if is_compressed(module):
            compressed += 1
            inside = name
            if which != "original":
                found.append(FoundExperts(name, module, module.layout))
            continue
        if name and _looks_like_experts(name, module):
            inside = name
            if which != "compressed":
                found.append(FoundExperts(name, module, layout_of(name, module)))
    if not found and required:
        model_name = type(model).__name__
        if which == "compressed":
            raise UnsupportedModelError(f"{model_name} has no moecore-compressed experts; run moecore.compress first")
        if compressed:
            raise UnsupportedModelError(f"{model_name} is already compressed by moecore ({compressed} layers)")
        raise UnsupportedModelError(
            f"{model_name} is not a Mixture-of-Experts model: no experts module "
            f"(e.g. 'mlp.experts' with 3-D gate_up_proj/down_proj) was found"
        )
    return found


def text_config(config):
    """The text model's config of ``config`` (itself unless it is a multimodal wrapper)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def config_dtype(config) -> torch.dtype:
    """The dtype ``config`` records (its text model's first; float32 when it records none)."""
    dtype = getattr(text_config(config), "dtype", None) or getattr(config, "dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def top_k_of(config) -> int:
    """Experts per token (``num_experts_per_tok`` / ``moe_topk`` / ``top_k``) from a config
    (its text model's for a multimodal wrapper)."""
    cfg = text_config(config)
    for name in ("num_experts_per_tok", "moe_topk", "top_k", "num_selected_experts"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    raise UnsupportedModelError(f"cannot find the number of experts per token in the {type(cfg).__name__}")
