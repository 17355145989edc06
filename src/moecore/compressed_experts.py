"""``CompressedExperts``: the drop-in replacement of a transformers experts module.

Forward keeps the transformers 5.x experts signature
``(hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k)) -> (T, H)``.
Stored parameter names are chosen to be safe from transformers' checkpoint key rewriting
(docs/ARCHITECTURE.md): ``core_{p}``, ``delta_a_{p}``/``delta_b_{p}`` or
``wrap_{u,v}_{in,out}_{p}``, ``bias_gate_up``/``bias_down``.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from .families import ExpertsLayout
from .maths import budget
from .maths.decompose import reconstruct_delta, reconstruct_wrapper

PROJECTIONS = ("gate", "up", "down")


class _Routing:
    """Routed (token, expert) pairs, sorted by expert.  When at least half the experts are
    hit, each low-rank path is one padded ``bmm`` over all experts (no per-token loop); when
    fewer are hit (decode), a loop over the hit experts' contiguous row ranges reads only
    their factors, with no copy.

    ``S = T·k`` pairs; pairs with the sentinel index ``E`` (no expert) are dropped.  All
    pair-level tensors (``expert``, ``token``, ``weight`` and every ``(S, d)`` activation)
    are in this sorted order; results go back to tokens with ``index_add_`` on ``token``.
    """

    def __init__(self, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int, dtype: torch.dtype):
        t, k = top_k_index.shape
        idx = top_k_index.reshape(-1)  # (S,)
        tok = torch.arange(t, device=idx.device).repeat_interleave(k)  # (S,)
        w = top_k_weights.reshape(-1).to(dtype)  # (S,)
        valid = (idx >= 0) & (idx < num_experts)
        if not bool(valid.all()):
            idx, tok, w = idx[valid], tok[valid], w[valid]
        order = torch.argsort(idx, stable=True)  # (S,)
        self.expert, self.token, self.weight = idx[order], tok[order], w[order]  # (S,) each, sorted by expert
        counts = torch.bincount(self.expert, minlength=num_experts)  # (E,)
        starts = torch.cumsum(counts, 0) - counts  # (E,)
        hit = torch.nonzero(counts).squeeze(-1)  # (n_hit,)
        self.hit = None if 2 * hit.numel() >= num_experts else hit  # few experts hit: loop over them
        self.num_experts = num_experts
        if self.hit is not None:  # contiguous row ranges [start, end) of the sorted pairs, one per hit expert
            self.ranges = list(zip(hit.tolist(), starts[hit].tolist(), (starts + counts)[hit].tolist()))
        else:  # padded layout for the bmm path: each pair's slot within its expert
            self.slot = torch.arange(self.expert.numel(), device=idx.device) - starts[self.expert]  # (S,)
            self.cap = int(counts.max()) if self.expert.numel() else 0

    def lowrank(self, x: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """Per pair ``left_e (right_eᵀ x)``: ``x (S, d_in)``, ``right (E, d_in, s)``,
        ``left (E, d_out, s)`` -> ``(S, d_out)``."""
        if x.shape[0] == 0:
            return x.new_zeros(0, left.shape[1])
        if self.hit is not None:  # few experts hit (decode): read only their factors, in place, no copy
            y = x.new_empty(x.shape[0], left.shape[1])  # (S, d_out)
            for e, a, b in self.ranges:
                y[a:b] = (x[a:b] @ right[e].to(x.dtype)) @ left[e].to(x.dtype).mT  # (n_e, s) -> (n_e, d_out)
            return y
        buf = x.new_zeros(self.num_experts, self.cap, x.shape[1])  # (E, cap, d_in)
        buf[self.expert, self.slot] = x
        z = torch.bmm(buf, right.to(x.dtype))  # (E, cap, s)
        y = torch.bmm(z, left.to(x.dtype).mT)  # (E, cap, d_out)
        return y[self.expert, self.slot]  # (S, d_out)


class CompressedExperts(nn.Module):
    """Shared-core experts of one MoE layer, in ``delta`` or ``wrapper`` form.

    Constructible from shapes alone (e.g. on the meta device for loading); fill it with
    :meth:`from_factors` / ``load_state_dict``.

    Args:
        num_experts, hidden_size, intermediate_size: E, H, F.
        form: ``"delta"`` (W_i = C + A_i B_iᵀ) or ``"wrapper"`` (W_i = (I+U_o V_oᵀ) C (I+U_i V_iᵀ)).
        ranks: ``{"gate": s, "up": s, "down": s}`` (the form's own rank per projection).
        layout: the family's :class:`ExpertsLayout` (activation, biases, fused layout).
        act_fn: activation module for ``layout.activation == "act_fn"`` (else unused; if
            ``None`` it is rebuilt from ``layout.hidden_act``).
    """

    def __init__(
        self, num_experts: int, hidden_size: int, intermediate_size: int, form: str, ranks: Mapping[str, int],
        layout: ExpertsLayout, act_fn: nn.Module | None = None, dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if form not in ("delta", "wrapper"):
            raise ValueError(f"form must be 'delta' or 'wrapper', got {form!r}")
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.form = form
        self.ranks = {p: int(ranks[p]) for p in PROJECTIONS}
        self.layout = layout
        self.act_fn = act_fn
        self._activation = layout.activation_fn(act_fn)
        self.report: dict = {}
        kw = {"dtype": dtype, "device": device}
        e, h, f = num_experts, hidden_size, intermediate_size
        for p in PROJECTIONS:
            d_out, d_in = self.proj_shape(p)
            r = self.ranks[p]
            self.register_parameter(f"core_{p}", nn.Parameter(torch.zeros(d_out, d_in, **kw)))
            if form == "delta":
                self.register_parameter(f"delta_a_{p}", nn.Parameter(torch.zeros(e, d_out, r, **kw)))
                self.register_parameter(f"delta_b_{p}", nn.Parameter(torch.zeros(e, d_in, r, **kw)))
            else:
                for name, d in (("u_in", d_in), ("v_in", d_in), ("u_out", d_out), ("v_out", d_out)):
                    self.register_parameter(f"wrap_{name}_{p}", nn.Parameter(torch.zeros(e, d, r, **kw)))
        if layout.has_bias:
            self.bias_gate_up = nn.Parameter(torch.zeros(e, 2 * f, **kw))
            self.bias_down = nn.Parameter(torch.zeros(e, h, **kw))

    # ------------------------------------------------------------------ shapes / stats
    def proj_shape(self, p: str) -> tuple[int, int]:
        """``(d_out, d_in)`` of projection ``p``."""
        h, f = self.hidden_size, self.intermediate_size
        return (h, f) if p == "down" else (f, h)

    def projection_shapes(self, key_prefix: str = "") -> list[budget.ProjectionShape]:
        """The three :class:`~moecore.maths.budget.ProjectionShape` of this layer."""
        return [budget.ProjectionShape((key_prefix, p), self.num_experts, *self.proj_shape(p)) for p in PROJECTIONS]

    def active_macs_per_token(self, top_k: int) -> int:
        """Matrix multiply-adds per token: delta runs each core once per token plus ``k``
        low-rank paths; wrapper runs the core ``k`` times plus ``k`` wrappers."""
        return budget.active_macs_per_token(self.form, self.projection_shapes(), {("", p): r for p, r in self.ranks.items()}, top_k)

    def extra_repr(self) -> str:
        return f"form={self.form}, E={self.num_experts}, H={self.hidden_size}, F={self.intermediate_size}, ranks={self.ranks}, layout={self.layout.name}"

    # ------------------------------------------------------------------ building
    @classmethod
    def from_factors(
        cls, layout: ExpertsLayout, form: str, cores: Mapping[str, torch.Tensor], factors: Mapping[str, tuple],
        biases: Mapping[str, torch.Tensor] | None = None, act_fn: nn.Module | None = None,
        dtype: torch.dtype | None = None, device: torch.device | str | None = None,
    ) -> "CompressedExperts":
        """Build from computed factors: ``cores[p] (d_out, d_in)``; ``factors[p]`` is
        ``(A, B)`` for delta or ``(U_in, V_in, U_out, V_out)`` for wrapper; ``biases`` has
        ``bias_gate_up (E, 2F)`` / ``bias_down (E, H)`` for biased layouts."""
        f, h = cores["gate"].shape
        e = factors["gate"][0].shape[0]
        ranks = {p: int(factors[p][0].shape[-1]) for p in PROJECTIONS}
        dtype = dtype or cores["gate"].dtype
        m = cls(e, h, f, form, ranks, layout, act_fn=act_fn, dtype=dtype, device=device)
        names = ("delta_a", "delta_b") if form == "delta" else ("wrap_u_in", "wrap_v_in", "wrap_u_out", "wrap_v_out")
        with torch.no_grad():
            for p in PROJECTIONS:
                getattr(m, f"core_{p}").copy_(cores[p])
                for n, t in zip(names, factors[p]):
                    getattr(m, f"{n}_{p}").copy_(t)
            if layout.has_bias:
                m.bias_gate_up.copy_(biases["bias_gate_up"])
                m.bias_down.copy_(biases["bias_down"])
        return m

    # ------------------------------------------------------------------ weights
    def expert_weights(self, p: str) -> torch.Tensor:
        """Dense ``(E, d_out, d_in)`` weights of projection ``p`` reconstructed from the factors."""
        c = getattr(self, f"core_{p}")
        if self.form == "delta":
            return reconstruct_delta(c, getattr(self, f"delta_a_{p}"), getattr(self, f"delta_b_{p}"))
        return reconstruct_wrapper(
            c, *(getattr(self, f"wrap_{n}_{p}") for n in ("u_in", "v_in", "u_out", "v_out"))
        )

    @torch.no_grad()
    def materialize(self) -> dict[str, torch.Tensor]:
        """The dense fused tensors in the family's own layout, e.g.
        ``{"gate_up_proj": (E, 2F, H), "down_proj": (E, H, F)}`` (+ biases)."""
        out = self.layout.fuse(*(self.expert_weights(p) for p in PROJECTIONS))
        if self.layout.has_bias:
            out[self.layout.gate_up_bias_attr] = self.bias_gate_up.detach().clone()
            out[self.layout.down_bias_attr] = self.bias_down.detach().clone()
        return out

    # ------------------------------------------------------------------ forward
    def _lowrank(self, route: _Routing, x: torch.Tensor, p: str, side: str = "") -> torch.Tensor:
        if self.form == "delta":
            return route.lowrank(x, getattr(self, f"delta_a_{p}"), getattr(self, f"delta_b_{p}"))
        return route.lowrank(x, getattr(self, f"wrap_u_{side}_{p}"), getattr(self, f"wrap_v_{side}_{p}"))

    def _wrapped(self, route: _Routing, x: torch.Tensor, p: str) -> torch.Tensor:
        """Wrapper form, per pair: ``x + U_in(V_inᵀx) -> C· -> h + U_out(V_outᵀh)``."""
        xi = x + self._lowrank(route, x, p, "in")  # (S, d_in)
        y = xi @ getattr(self, f"core_{p}").mT  # (S, d_out): the core runs once per pair
        return y + self._lowrank(route, y, p, "out")

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """``(T, H), (T, k), (T, k) -> (T, H)``; same contract as transformers' experts."""
        x = hidden_states
        route = _Routing(top_k_index, top_k_weights, self.num_experts, x.dtype)
        xs = x[route.token]  # (S, H)
        if self.form == "delta":
            # core once per token, then per routed pair add A_i (B_iᵀ x)
            gate = (x @ self.core_gate.mT)[route.token] + self._lowrank(route, xs, "gate")  # (S, F)
            up = (x @ self.core_up.mT)[route.token] + self._lowrank(route, xs, "up")  # (S, F)
        else:
            gate, up = self._wrapped(route, xs, "gate"), self._wrapped(route, xs, "up")
        if self.layout.has_bias:
            bg, bu = self.layout.split_bias(self.bias_gate_up)  # (E, F) each
            gate, up = gate + bg[route.expert], up + bu[route.expert]
        h = self._activation(gate, up)  # (S, F)
        w = route.weight.unsqueeze(-1)  # (S, 1)
        out = torch.zeros_like(x)  # (T, H)
        if self.form == "delta":
            # down: C (Σ_i w_i h_i) once per token + Σ_i w_i A_i (B_iᵀ h_i)
            mixed = x.new_zeros(x.shape[0], h.shape[1]).index_add_(0, route.token, w * h)  # (T, F)
            out.index_add_(0, route.token, w * self._lowrank(route, h, "down"))
            out = out + mixed @ self.core_down.mT
        else:
            out.index_add_(0, route.token, w * self._wrapped(route, h, "down"))
        if self.layout.has_bias:
            out.index_add_(0, route.token, w * self.bias_down[route.expert])
        return out
