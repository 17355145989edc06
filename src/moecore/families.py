"""Architecture quirks as data: one :class:`ExpertsLayout` per experts storage layout, and
detection of the experts modules of a transformers model.

transformers 5.x stores the routed experts of every MoE family as one module (usually
``mlp.experts``) with fused 3-D parameters.  The default fused layout
(``gate_up_proj (E, 2F, H)`` with gate first, ``down_proj (E, H, F)``, ``act_fn(gate) * up``)
covers Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3 and every other family that uses it, with
no code change.  GPT-OSS (interleaved, transposed, biased, clamped SwiGLU) is one more
entry in :data:`KNOWN_LAYOUTS`.  Anything that looks like experts but fits no layout raises
:class:`UnsupportedModelError` naming the module: nothing is skipped silently.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .errors import UnsupportedModelError


@dataclass(frozen=True)
class ExpertsLayout:
    """How one family stores its experts (all fields plain data, JSON-able).

    Attributes:
        name: layout name (``"fused"``, ``"gpt_oss"``).
        gate_up_attr / down_attr: parameter names of the fused tensors.
        gate_up_bias_attr / down_bias_attr: bias parameter names (``None`` when no bias).
        transposed: weights stored ``(E, d_in, d_out)`` (``x @ W``) instead of ``(E, d_out, d_in)``.
        interleaved: gate/up interleaved along the fused axis (``[..., ::2]`` is gate) instead
            of concatenated (first half gate).
        activation: ``"act_fn"`` (``act_fn(gate) * up``, ``act_fn`` from ``hidden_act``) or
            ``"clamped_swiglu"`` (GPT-OSS: ``(clamp(up)+1) * g·σ(α g)`` with ``g = clamp(gate)``).
        hidden_act: ``ACT2FN`` name of ``act_fn`` (``"act_fn"`` activation only).
        alpha / limit: clamped SwiGLU parameters.
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

    @property
    def has_bias(self) -> bool:
        """True when the layout carries per-expert biases (kept uncompressed)."""
        return self.gate_up_bias_attr is not None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for ``quantization_config``)."""
        return dataclasses.asdict(self)

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
        ``"bias_down" (E,H)`` in the family's own bias layout).  Views, no copies."""
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
        """``(gate, up) -> h``: the family's gated activation (``act_fn`` for the default)."""
        if self.activation == "act_fn":
            if act_fn is None:
                from transformers.activations import ACT2FN

                if self.hidden_act is None:
                    raise UnsupportedModelError(f"layout {self.name!r} needs an act_fn or hidden_act")
                act_fn = ACT2FN[self.hidden_act]
            return lambda gate, up: act_fn(gate) * up
        if self.activation == "clamped_swiglu":
            alpha, limit = self.alpha, self.limit

            def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
                gate = gate.clamp(min=None, max=limit)
                up = up.clamp(min=-limit, max=limit)
                return (up + 1) * (gate * torch.sigmoid(gate * alpha))

            return swiglu
        raise UnsupportedModelError(f"unknown activation kind {self.activation!r}")


FUSED = ExpertsLayout()
GPT_OSS = ExpertsLayout(
    name="gpt_oss", gate_up_bias_attr="gate_up_proj_bias", down_bias_attr="down_proj_bias",
    transposed=True, interleaved=True, activation="clamped_swiglu",
)

#: Experts classes whose layout differs from :data:`FUSED`, keyed by class name.  The value
#: maps the module to its layout (per-model data such as the SwiGLU clamp is read off it).
KNOWN_LAYOUTS: dict[str, Callable[[nn.Module], ExpertsLayout]] = {
    "GptOssExperts": lambda m: dataclasses.replace(GPT_OSS, alpha=float(m.alpha), limit=float(m.limit)),
}


def _hidden_act_name(module: nn.Module) -> str | None:
    cfg = getattr(module, "config", None)
    act = getattr(cfg, "hidden_act", None)
    return act if isinstance(act, str) else None


def _looks_like_experts(name: str, module: nn.Module) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "experts":
        return True
    gu, dn = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return isinstance(gu, nn.Parameter) and isinstance(dn, nn.Parameter) and gu.dim() == 3


def is_compressed(module: nn.Module) -> bool:
    """True for a moecore experts module (``CompressedExperts`` and its subclasses carry the
    class attribute ``moecore_compressed``; checked by attribute so that this module does not
    import the module that imports it)."""
    return bool(getattr(type(module), "moecore_compressed", False))


def layout_of(name: str, module: nn.Module) -> ExpertsLayout:
    """The :class:`ExpertsLayout` of experts module ``module`` at path ``name`` (works on the
    meta device).  Raises :class:`UnsupportedModelError` naming ``name`` if moecore can't
    handle it."""
    cls = type(module).__name__
    if is_compressed(module):
        raise UnsupportedModelError(f"{name} is already compressed by moecore")
    if cls in KNOWN_LAYOUTS:
        layout = KNOWN_LAYOUTS[cls](module)
    else:
        layout = dataclasses.replace(FUSED, hidden_act=_hidden_act_name(module))
        if isinstance(module, (nn.ModuleList, nn.ModuleDict, nn.Sequential)):
            raise UnsupportedModelError(
                f"{name} ({cls}) stores its experts as a list of separate modules; moecore supports "
                f"only fused 3-D expert tensors (gate_up_proj / down_proj)"
            )
        if getattr(module, "has_gate", True) is False or getattr(module, "has_post_expert_norm", False):
            raise UnsupportedModelError(f"{name} ({cls}): experts without gate or with a post-expert norm are not supported")
        if getattr(module, "is_transposed", False) or getattr(module, "has_bias", False) or \
                getattr(module, "is_concatenated", True) is False:
            raise UnsupportedModelError(
                f"{name} ({cls}): transposed / biased / interleaved experts are supported only for "
                f"known classes {sorted(KNOWN_LAYOUTS)}; add its layout to moecore.families.KNOWN_LAYOUTS"
            )
        apply_gate = getattr(type(module), "_apply_gate", None)
        if apply_gate is not None and getattr(apply_gate, "__name__", "") != "_default_apply_gate":
            raise UnsupportedModelError(f"{name} ({cls}) has a custom gated activation moecore does not know")
        if not isinstance(getattr(module, "act_fn", None), nn.Module) and layout.hidden_act is None:
            raise UnsupportedModelError(f"{name} ({cls}) has no act_fn")
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


def find_experts(model: nn.Module) -> list[tuple[str, nn.Module, ExpertsLayout]]:
    """Every experts module of ``model`` as ``(path, module, layout)``, in model order.

    Raises :class:`UnsupportedModelError` if the model has no experts module ("not a
    Mixture-of-Experts model") or one of them has a layout moecore can't handle.
    """
    found: list[tuple[str, nn.Module, ExpertsLayout]] = []
    compressed = 0
    inside: str | None = None
    for name, module in model.named_modules():
        if inside is not None and name.startswith(inside + "."):
            continue  # children of an experts module
        if is_compressed(module):
            compressed += 1
            inside = name
            continue
        if name and _looks_like_experts(name, module):
            found.append((name, module, layout_of(name, module)))
            inside = name
    if not found:
        if compressed:
            raise UnsupportedModelError(f"{type(model).__name__} is already compressed by moecore ({compressed} layers)")
        raise UnsupportedModelError(
            f"{type(model).__name__} is not a Mixture-of-Experts model: no experts module "
            f"(e.g. 'mlp.experts' with 3-D gate_up_proj/down_proj) was found"
        )
    return found
