"""A layer's original experts read a chunk of experts at a time.

While the layer engine (:mod:`moecore.engine`) works on a decoder layer, each of its routed
experts modules is replaced by a :class:`SourcedExperts`: the same call
(``forward(hidden (T, H), top_k_index (T, k), top_k_weights (T, k)) -> (T, H)``) and the
same per-projection views (:meth:`~moecore.families.ExpertsLayout.split` asks it for
:meth:`SourcedExperts.expert_views`), but its weights come from an :class:`ExpertSource`:

* :class:`InMemorySource`: the experts module's own tensors (a model in memory, or a layer
  read whole from the checkpoint);
* ``CheckpointExperts`` (:mod:`moecore.checkpoint_reader`): experts ``a:b`` read from the
  safetensors shards when asked, so a layer larger than host memory (a DeepSeek-V3 layer
  holds 22.5 GB of bf16 experts) never has more than one chunk of its experts in memory.

Every consumer reads the weights through :class:`ExpertView` slices (``w[a:b]``, ``w[e]``),
and the experts' output is computed expert by expert in index order into one buffer
(:func:`routed_outputs`), so the result does not depend on where the chunks fall: a layer
read in chunks is compressed to the same bytes as one read whole.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .families import ExpertsLayout


class ExpertSource:
    """Experts ``a:b`` of one experts module as ``{"gate" (c,F,H), "up" (c,F,H), "down" (c,H,F)
    [, "bias_gate_up" (c,2F), "bias_down" (c,H)]}`` (:meth:`chunk`); the last chunk read is
    kept, and a single expert is read with the ``block`` experts around it, so an
    expert-by-expert pass reads each block once."""

    def __init__(self, shapes: dict[str, torch.Size], dtype: torch.dtype, device, block: int):
        self.shapes, self.dtype, self.device = shapes, dtype, torch.device(device)
        self.num_experts = shapes["gate"][0]
        self.block = max(1, min(block, self.num_experts))
        self._cached: tuple[int, int, dict[str, torch.Tensor]] | None = None

    def read(self, a: int, b: int) -> dict[str, torch.Tensor]:
        """Experts ``a:b``, freshly read (subclasses)."""
        raise NotImplementedError

    def chunk(self, a: int, b: int) -> dict[str, torch.Tensor]:
        """Experts ``a:b`` (``0 <= a < b <= E``), from the kept chunk when it covers them."""
        got = self._cached
        if got is None or not (got[0] <= a and b <= got[1]):
            got = self._cached = None  # free the old chunk before reading the next
            lo, hi = (a // self.block * self.block, min(self.num_experts, (a // self.block + 1) * self.block)) \
                if b - a == 1 else (a, b)
            self._cached = got = (lo, hi, self.read(lo, hi))
        lo, _, views = got
        return {k: v[a - lo: b - lo] for k, v in views.items()}


class InMemorySource(ExpertSource):
    """The experts of a module whose tensors are in memory (views, no copies)."""

    def __init__(self, module: nn.Module, layout: ExpertsLayout):
        self.views = layout.split(module)
        gate = self.views["gate"]
        super().__init__({k: v.shape for k, v in self.views.items()}, gate.dtype, gate.device, gate.shape[0])

    def read(self, a: int, b: int) -> dict[str, torch.Tensor]:
        return {k: v[a:b] for k, v in self.views.items()}


class ExpertView:
    """One projection's ``(E, d_out, d_in)`` weights (or a bias stack) read through a source:
    ``shape``, ``dtype``, ``device`` and ``w[a:b]`` / ``w[e]`` / ``w[:]`` like the tensor view
    it stands for; ``detach()`` is itself (nothing is tracked)."""

    def __init__(self, source: ExpertSource, key: str):
        self.source, self.key = source, key
        self.shape, self.dtype, self.device = source.shapes[key], source.dtype, source.device
        self.ndim = len(self.shape)

    def __getitem__(self, index) -> torch.Tensor:
        e = self.shape[0]
        if isinstance(index, int):
            i = index + e if index < 0 else index
            if not 0 <= i < e:
                raise IndexError(f"expert {index} out of range for {e} experts")
            return self.source.chunk(i, i + 1)[self.key][0]
        if isinstance(index, slice) and index.step in (None, 1):
            a, b, _ = index.indices(e)
            if b <= a:
                return torch.empty((0, *self.shape[1:]), dtype=self.dtype, device=self.device)
            return self.source.chunk(a, b)[self.key]
        raise TypeError(f"an expert view takes an expert index or a contiguous slice, not {index!r}")

    def detach(self) -> "ExpertView":
        return self

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point


def group_pairs(top_k_index: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The routed (token, slot) pairs of ``top_k_index (N, k)`` grouped by expert:
    ``(pairs (S,), counts (E,))``, ``pairs`` the flat indices ``t·k + j`` of the pairs whose
    expert is in ``[0, E)`` (``-1``, "no expert", and out-of-range indices dropped), sorted by
    expert and, within an expert, in token order; ``counts`` int64, pairs per expert."""
    flat = top_k_index.reshape(-1)  # (N·k,)
    valid = (flat >= 0) & (flat < num_experts)
    order = torch.argsort(torch.where(valid, flat, -1), stable=True)  # the dropped pairs first
    pairs = order[int((~valid).sum()):]  # (S,)
    return pairs, torch.bincount(flat[pairs], minlength=num_experts)


def routed_outputs(views: dict, layout: ExpertsLayout, act: Callable, x: torch.Tensor, top_k_index: torch.Tensor,
                   top_k_weights: torch.Tensor) -> torch.Tensor:
    """The experts' routing-weighted output ``(N, H)`` on ``x (N, H)``, ``top_k_index (N, k)``,
    ``top_k_weights (N, k)``: ``Σ_j w_j · down_e(act(gate_e x, up_e x))`` over a token's experts,
    added in expert order into one buffer, each expert's weights cast to ``x``'s dtype (one
    expert at a time; ``views`` may be :class:`ExpertView`).  Index ``-1`` (no expert) adds nothing."""
    out = torch.zeros_like(x)  # (N, H)
    if x.shape[0] == 0:
        return out
    pairs_all, counts = group_pairs(top_k_index, views["gate"].shape[0])
    k = top_k_index.shape[1]
    wd = dict(device=x.device, dtype=x.dtype)
    start = 0
    for e, n in enumerate(counts.tolist()):
        if not n:
            continue
        pairs = pairs_all[start: start + n]
        start += n
        tok = pairs // k  # (n,)
        xe = x[tok]  # (n, H)
        gate, up = xe @ views["gate"][e].to(**wd).mT, xe @ views["up"][e].to(**wd).mT  # (n, F) each
        if layout.has_bias:
            bg, bu = layout.split_bias(views["bias_gate_up"][e].to(**wd))
            gate, up = gate + bg, up + bu
        y = act(gate, up) @ views["down"][e].to(**wd).mT  # (n, H)
        if layout.has_bias:
            y = y + views["bias_down"][e].to(**wd)
        out.index_add_(0, tok, y * top_k_weights.reshape(-1)[pairs, None].to(x.dtype))
    return out


class SourcedExperts(nn.Module):
    """Stands in for an original routed experts module while the engine works on its layer
    (see the module docstring).  ``replay``: outputs to return, one per call, instead of
    computing them (the engine computes a layer's experts once, on every calibration row,
    and replays them per batch)."""

    def __init__(self, source: ExpertSource, layout: ExpertsLayout, original: nn.Module):
        super().__init__()
        if layout.call != "routed":
            raise ValueError(f"layout {layout.name!r} is called {layout.call!r}, not routed")
        self.source, self.layout = source, layout
        self.num_experts = source.num_experts
        act_fn = getattr(original, "act_fn", None)
        if act_fn is not None:
            self.act_fn = act_fn
        self.act = layout.activation_fn(act_fn)
        self.replay: list[torch.Tensor] | None = None

    def expert_views(self) -> dict[str, ExpertView]:
        """``layout.split``'s views, read through the source."""
        return {k: ExpertView(self.source, k) for k in self.source.shapes}

    def outputs(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """:func:`routed_outputs` of these experts."""
        return routed_outputs(self.expert_views(), self.layout, self.act, x, top_k_index, top_k_weights)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        if self.replay:
            out = self.replay.pop(0)
            return out.to(device=hidden_states.device, dtype=hidden_states.dtype).reshape(hidden_states.shape)
        x, idx, w = self.layout.routed_call(hidden_states, top_k_index, top_k_weights, self.num_experts)
        return self.outputs(x, idx, w).reshape(hidden_states.shape)
