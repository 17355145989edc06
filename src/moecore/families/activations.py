"""The gated activations of the experts families, as data: :data:`ACTIVATIONS` maps a layout's
``activation`` name to ``(uses the module's act_fn, builder(layout, act_fn))``, each mirroring
one family's ``_apply_gate``.  A new one is added with :func:`register_activation`."""
from __future__ import annotations

from typing import Any, Callable

import torch

from ..errors import ConfigError

#: ``(gate, up) -> h``
Activation = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: ``builder(layout, act_fn) -> Activation``; ``layout`` an :class:`~moecore.families.layouts.ExpertsLayout`
#: (its ``alpha`` / ``limit``), typed ``Any`` here because that module imports this one
Builder = Callable[[Any, Callable | None], Activation]


def _clamp(x: torch.Tensor, limit: float | None, low: bool = True) -> torch.Tensor:
    """``x`` clamped to ``[-limit, limit]`` (``low=False``: only from above); ``None``: no clamp."""
    if limit is None:
        return x
    return x.clamp(min=-limit if low else None, max=limit)


def _clamped_swiglu(layout: Any, act_fn) -> Activation:
    alpha, limit = layout.alpha, layout.limit

    def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate = _clamp(gate, limit, low=False)
        return (_clamp(up, limit) + 1) * (gate * torch.sigmoid(gate * alpha))

    return swiglu


#: Gated activations ``(gate, up) -> h`` by :attr:`ExpertsLayout.activation`: ``(uses the
#: module's act_fn, builder(layout, act_fn))``; each mirrors one family's ``_apply_gate``.
ACTIVATIONS: dict[str, tuple[bool, Builder]] = {
    # transformers' default: act_fn(gate) * up
    "act_fn": (True, lambda lay, act: lambda gate, up: act(gate) * up),
    # Beam: the same in float32, cast back
    "act_fn_fp32": (True, lambda lay, act: lambda gate, up: (act(gate.float()) * up.float()).to(gate.dtype)),
    # Inkling-2: a two-argument activation module (softcapped SwiGLU)
    "act_fn_pair": (True, lambda lay, act: lambda gate, up: act(gate, up)),
    # DeepSeek-V4: act_fn(clamp(gate)) * clamp(up)
    "clamped_act_fn": (True, lambda lay, act: lambda gate, up: act(_clamp(gate, lay.limit, low=False))
                       * _clamp(up, lay.limit)),
    # Step-3.7, Bailing-hybrid: clamp(act_fn(gate)) * clamp(up)
    "act_fn_clamped": (True, lambda lay, act: lambda gate, up: _clamp(act(gate), lay.limit, low=False)
                       * _clamp(up, lay.limit)),
    # HY-V4: silu(clamp(gate)) * clamp(up), whatever act_fn is
    "clamped_silu": (False, lambda lay, act: lambda gate, up: torch.nn.functional.silu(
        _clamp(gate, lay.limit, low=False)) * _clamp(up, lay.limit)),
    # GPT-OSS: (clamp(up) + 1) * g·σ(α g) with g = clamp(gate)
    "clamped_swiglu": (False, _clamped_swiglu),
}




def register_activation(name: str, build: Builder, *, uses_act_fn: bool) -> None:
    """Add a gated activation ``(gate, up) -> h`` for :attr:`ExpertsLayout.activation` = ``name``:
    ``build(layout, act_fn)`` returns it (``act_fn`` the module's activation when
    ``uses_act_fn``).  ``ConfigError`` if the name is taken."""
    if name in ACTIVATIONS:
        raise ConfigError(f"activation {name!r} is already registered")
    ACTIVATIONS[name] = (uses_act_fn, build)


def uses_act_fn(layout: Any) -> bool:
    """Whether ``layout``'s activation uses the module's ``act_fn``."""
    return ACTIVATIONS.get(layout.activation, (False, None))[0]
