"""How each family stores and calls its experts, as data: :class:`ExpertsLayout`, the
built-in layouts, :data:`KNOWN_LAYOUTS` (experts classes registered by name, with the per-model
values read off the module), :data:`UNSUPPORTED` (classes moecore can't compress, with the
reason), and :func:`register_layout`, the public way to add a family.

transformers 5 stores the routed experts of every MoE family as one module (usually
``mlp.experts``) holding fused 3-D tensors; :class:`ExpertsModule` is the protocol moecore
reads off such a module, :class:`ExpertsImplementationMarkers` the flags transformers'
``@use_experts_implementation`` sets on it.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Literal, Protocol, runtime_checkable

import torch
from torch import nn
from transformers.activations import ACT2FN

from ..errors import ConfigError, UnsupportedModelError
from .activations import ACTIVATIONS, uses_act_fn


@runtime_checkable
class ExpertsModule(Protocol):
    """What moecore reads off a transformers 5 fused experts module.

    ``gate_up_proj`` is ``(E, 2F, H)`` (``(E, H, 2F)`` when transposed) and ``down_proj``
    ``(E, H, F)`` (``(E, F, H)`` transposed).  Most classes also carry ``act_fn`` (the
    activation of ``act_fn(gate) * up``) and ``hidden_dim`` / ``intermediate_dim`` (some say
    ``hidden_size`` / ``intermediate_size``); moecore reads shapes off the tensors.
    """

    num_experts: int
    gate_up_proj: torch.Tensor
    down_proj: torch.Tensor


@runtime_checkable
class ExpertsImplementationMarkers(Protocol):
    """The flags transformers' ``@use_experts_implementation`` sets on every instance (the
    layout its own ``grouped_mm`` / ``batched_mm`` kernels assume); ``_apply_gate`` is the
    class's gated activation (``_default_apply_gate``: ``act_fn(gate) * up``)."""

    is_transposed: bool
    is_concatenated: bool
    has_bias: bool
    has_gate: bool
    has_post_expert_norm: bool


@dataclass(frozen=True)
class ExpertsLayout:
    """How one family stores and calls its experts (all fields plain data, JSON-able).

    Attributes:
        name: layout name (``"fused"``, ``"gpt_oss"``, ``"llama4"``, ...).
        gate_up_attr / down_attr: parameter names of the fused tensors.
        gate_up_bias_attr / down_bias_attr: bias parameter names (``None`` when no bias).
        transposed: weights stored ``(E, d_in, d_out)`` (``x @ W``) instead of ``(E, d_out, d_in)``.
        interleaved: gate/up interleaved along the fused axis (``[..., ::2]`` is gate) instead
            of concatenated (first half gate).
        activation: the gated activation, a key of :data:`ACTIVATIONS` (``"act_fn"``:
            ``act_fn(gate) * up``, the transformers default; the others are the clamped or
            float32 variants some families define in their ``_apply_gate``).
        hidden_act: ``ACT2FN`` name of ``act_fn`` (activations that use it).
        alpha / limit: clamped activation parameters (``limit=None``: no clamp).
        call: how the model calls the experts module: ``"routed"`` (transformers 5:
            ``forward(hidden (T, H), top_k_index (T, k), top_k_weights (T, k))``, outputs
            weighted by the routing weights) or ``"dense_prescaled"`` (Llama-4:
            ``forward(hidden (E·T, H))``, every expert's block of ``T`` rows already multiplied
            by its router score, which is 0 for the experts a token is not routed to).
    """

    name: str = "fused"
    gate_up_attr: str = "gate_up_proj"
    down_attr: str = "down_proj"
    gate_up_bias_attr: str | None = None
    down_bias_attr: str | None = None
    transposed: bool = False
    interleaved: bool = False
    activation: str = "act_fn"
    hidden_act: str | None = None
    alpha: float | None = None
    limit: float | None = None
    call: Literal["routed", "dense_prescaled"] = "routed"

    #: fields added after the checkpoint format was fixed: written only when not at their
    #: default, so that the ``quantization_config`` of existing families does not change
    _LATE_FIELDS = ("call",)

    @property
    def has_bias(self) -> bool:
        """True when the layout carries per-expert biases (kept uncompressed)."""
        return self.gate_up_bias_attr is not None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for ``quantization_config``)."""
        out = dataclasses.asdict(self)
        for f in dataclasses.fields(self):
            if f.name in self._LATE_FIELDS and out[f.name] == f.default:
                del out[f.name]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ExpertsLayout":
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise UnsupportedModelError(f"unknown experts layout key(s): {sorted(unknown)}")
        return cls(**data)

    # ------------------------------------------------------------------ tensor views
    def split(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """Per-projection weights of ``module`` in ``(E, d_out, d_in)`` convention:
        ``{"gate": (E,F,H), "up": (E,F,H), "down": (E,H,F)}`` (+ ``"bias_gate_up" (E,2F)``,
        ``"bias_down" (E,H)`` in the family's own bias layout).  Views, no copies.  A module
        with an ``expert_views()`` method (the engine's stand-in for experts read a chunk at a
        time, :class:`moecore.expert_source.SourcedExperts`) gives its own."""
        own = getattr(module, "expert_views", None)
        if callable(own):
            return own()
        gu = getattr(module, self.gate_up_attr)
        dn = getattr(module, self.down_attr)
        if self.transposed:
            gu, dn = gu.mT, dn.mT  # (E, 2F, H), (E, H, F)
        if self.interleaved:
            gate, up = gu[:, 0::2], gu[:, 1::2]  # (E, F, H) each
        else:
            f = gu.shape[1] // 2
            gate, up = gu[:, :f], gu[:, f:]
        out = {"gate": gate, "up": up, "down": dn}
        if self.has_bias:
            out["bias_gate_up"] = getattr(module, self.gate_up_bias_attr)
            out["bias_down"] = getattr(module, self.down_bias_attr)
        return out

    def fuse(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> dict[str, torch.Tensor]:
        """Inverse of :meth:`split`: ``gate/up (E,F,H), down (E,H,F)`` -> the family's fused
        tensors keyed by attribute name (biases are added by the caller)."""
        if self.interleaved:
            e, f, h = gate.shape
            gu = torch.stack([gate, up], dim=2).reshape(e, 2 * f, h)  # (E, 2F, H), gate at even rows
        else:
            gu = torch.cat([gate, up], dim=1)  # (E, 2F, H)
        if self.transposed:
            gu, down = gu.mT, down.mT
        return {self.gate_up_attr: gu.contiguous(), self.down_attr: down.contiguous()}

    def split_bias(self, bias_gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(..., 2F)`` fused bias -> gate ``(..., F)``, up ``(..., F)``."""
        if self.interleaved:
            return bias_gate_up[..., 0::2], bias_gate_up[..., 1::2]
        return bias_gate_up.chunk(2, dim=-1)

    def activation_fn(self, act_fn: Callable | None = None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """``(gate, up) -> h``: the family's gated activation (:data:`ACTIVATIONS`), using the
        module's ``act_fn`` (rebuilt from :attr:`hidden_act` when not given)."""
        if self.activation not in ACTIVATIONS:
            raise UnsupportedModelError(f"unknown activation kind {self.activation!r}")
        uses_act_fn, build = ACTIVATIONS[self.activation]
        if uses_act_fn and act_fn is None:
            if self.hidden_act is None:
                raise UnsupportedModelError(f"layout {self.name!r} needs an act_fn or hidden_act")
            act_fn = ACT2FN[self.hidden_act]
        return build(self, act_fn)

    # ------------------------------------------------------------------ call convention
    def routed_call(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor | None,
                    top_k_weights: torch.Tensor | None, num_experts: int, *, skip_unrouted: bool = False,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The arguments of one call of the experts module as ``(x (N, H), top_k_index (N, k),
        top_k_weights (N, k))`` whatever :attr:`call` is.

        ``"dense_prescaled"``: row ``n`` of the ``(E·T, H)`` input goes to expert ``n // T``
        with weight 1 (its router score is already in the row).  ``skip_unrouted`` gives the
        all-zero rows (experts a token is not routed to) the index ``-1`` ("no expert"), so
        calibration counts only routed tokens; they contribute nothing either way.
        """
        x = hidden_states.reshape(-1, hidden_states.shape[-1])  # (N, H)
        if self.call == "routed":
            if top_k_index is None or top_k_weights is None:
                raise TypeError(f"experts of layout {self.name!r} need hidden_states, top_k_index, top_k_weights")
            k = top_k_index.shape[-1]  # (not -1: ambiguous for zero tokens)
            return x, top_k_index.reshape(x.shape[0], k), top_k_weights.reshape(x.shape[0], k)
        if self.call == "dense_prescaled":
            n = x.shape[0]
            idx = torch.arange(num_experts, device=x.device).repeat_interleave(n // num_experts)[:, None]  # (N, 1)
            if skip_unrouted:
                idx = torch.where((x != 0).any(-1, keepdim=True), idx, torch.full_like(idx, -1))
            return x, idx, torch.ones(n, 1, dtype=x.dtype, device=x.device)
        raise UnsupportedModelError(f"unknown experts call convention {self.call!r}")


FUSED = ExpertsLayout()
GPT_OSS = ExpertsLayout(
    name="gpt_oss", gate_up_bias_attr="gate_up_proj_bias", down_bias_attr="down_proj_bias",
    transposed=True, interleaved=True, activation="clamped_swiglu",
)
LLAMA4 = ExpertsLayout(name="llama4", transposed=True, call="dense_prescaled")


@dataclass(frozen=True)
class KnownLayout:
    """A registered experts class: its layout and the per-model values read off the module
    (``params``: layout field -> module attribute, e.g. ``{"limit": "swiglu_limit"}``)."""

    layout: ExpertsLayout
    params: tuple[tuple[str, str], ...] = ()

    def resolve(self, module: nn.Module) -> ExpertsLayout:
        """The layout of ``module`` (registered values plus the module's own)."""
        values = {field: _finite(getattr(module, attr)) for field, attr in self.params}
        if uses_act_fn(self.layout) and self.layout.hidden_act is None:
            values["hidden_act"] = hidden_act_name(module)
        return dataclasses.replace(self.layout, **values)


def _finite(value) -> float | None:
    """A module's clamp parameter as a float; ``None`` or infinite: no clamp (``None``)."""
    return None if value is None or math.isinf(float(value)) else float(value)


def _gated(kind: str) -> ExpertsLayout:
    """The default fused layout with the gated activation ``ACTIVATIONS[kind]``."""
    return ExpertsLayout(name=kind, activation=kind)


_LIMIT, _SWIGLU_LIMIT = (("limit", "limit"),), (("limit", "swiglu_limit"),)

#: Experts classes whose layout the transformers markers don't describe, keyed by class name.
KNOWN_LAYOUTS: dict[str, KnownLayout] = {
    "GptOssExperts": KnownLayout(GPT_OSS, (("alpha", "alpha"),) + _LIMIT),
    "OpenAIPrivacyFilterExperts": KnownLayout(
        dataclasses.replace(GPT_OSS, name="gpt_oss_concatenated", interleaved=False), (("alpha", "alpha"),) + _LIMIT),
    "MiniMaxM3VLExperts": KnownLayout(_gated("clamped_swiglu"), (("alpha", "swiglu_alpha"),) + _SWIGLU_LIMIT),
    "Llama4TextExperts": KnownLayout(LLAMA4),
    "DeepseekV4Experts": KnownLayout(_gated("clamped_act_fn"), _LIMIT),
    **{cls: KnownLayout(_gated("act_fn_clamped"), _LIMIT) for cls in ("Step3p7Experts", "BailingHybridExperts")},
    **{cls: KnownLayout(_gated("clamped_silu"), _SWIGLU_LIMIT)
       for cls in ("HYV4Experts", "HYV4VLExperts", "Glm5NextTextExperts")},
    "BeamExperts": KnownLayout(_gated("act_fn_fp32")),
    **{cls: KnownLayout(_gated("act_fn_pair")) for cls in ("Inkling2Experts", "Inkling2LoopExperts")},
}

#: Experts classes moecore can't compress, with the reason (raised as UnsupportedModelError).
UNSUPPORTED: dict[str, str] = {
    "LongcatFlashExperts": "its router also picks zero-computation (identity) experts that share the "
                           "gate_up_proj tensor but have no down_proj; moecore's drop-in has no identity experts",
    "DbrxExperts": "its experts are stored as flattened 2-D w1/v1/w2 tensors (E*F, H) in a child module, "
                   "not as fused 3-D gate_up_proj/down_proj",
    "JetMoeMoA": "JetMoE's mixture-of-attention experts and its parallel experts (input_linear/output_linear) "
                 "are not gated gate_up_proj/down_proj experts",
}




def hidden_act_name(module: nn.Module) -> str | None:
    """The ``ACT2FN`` name of ``module``'s activation, from its ``config.hidden_act`` (or ``None``)."""
    cfg = getattr(module, "config", None)
    act = getattr(cfg, "hidden_act", None)
    return act if isinstance(act, str) else None


def register_layout(experts_class: str | type, layout: ExpertsLayout,
                    params: dict[str, str] | None = None, *, replace: bool = False) -> None:
    """Teach moecore an experts class whose layout transformers' markers don't describe
    (:func:`~moecore.families.discovery.layout_of` looks it up by class name first).

    Args:
        experts_class: the experts module class, or its name (e.g. ``"GptOssExperts"``).
        layout: how it stores and calls its experts; its ``activation`` must be registered
            (:func:`~moecore.families.activations.register_activation` adds one).
        params: layout field -> module attribute read per model, e.g. ``{"limit": "swiglu_limit"}``.
        replace: allow replacing a registered class (otherwise ``ConfigError``).
    """
    name = experts_class if isinstance(experts_class, str) else experts_class.__name__
    if not replace and name in KNOWN_LAYOUTS:
        raise ConfigError(f"experts class {name!r} already has a registered layout (pass replace=True)")
    if layout.activation not in ACTIVATIONS:
        raise ConfigError(f"layout {layout.name!r}: unknown activation {layout.activation!r}; "
                          f"register it first (moecore.families.register_activation)")
    fields = {f.name for f in dataclasses.fields(ExpertsLayout)}
    unknown = sorted(set(params or {}) - fields)
    if unknown:
        raise ConfigError(f"register_layout: {unknown} are not ExpertsLayout fields")
    if replace:
        UNSUPPORTED.pop(name, None)
    KNOWN_LAYOUTS[name] = KnownLayout(layout, tuple((params or {}).items()))
