"""``CompressedExperts``: the drop-in replacement of a transformers experts module.

Forward keeps the transformers 5.x experts signature
``(hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k)) -> (T, H)``.
Stored parameter names are chosen to be safe from transformers' checkpoint key rewriting
(docs/ARCHITECTURE.md): ``core_{p}``, ``delta_a_{p}``/``delta_b_{p}`` or
``wrap_{u,v}_{in,out}_{p}``, ``bias_gate_up``/``bias_down``.

The forward (maths in :mod:`moecore.grouped`) has no host synchronization: grouped GEMMs
with offsets for the per-expert low-rank paths, gate and up in one grouped pass, the core
once per token (delta) or once per pair (wrapper).  Its grouped-GEMM weights are built from
the stored tensors and, when no gradient is needed, cached on the module (about one more
copy of the factors; see :attr:`CompressedExperts.cache_operands`).
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from . import grouped
from .families import ExpertsLayout
from .maths import budget
from .maths.decompose import reconstruct_delta, reconstruct_wrapper

PROJECTIONS = ("gate", "up", "down")


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

    moecore_compressed = True  # what :func:`moecore.families.is_compressed` looks for

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
    #: Cache the grouped-GEMM operands between inference calls (rebuilt when a stored tensor
    #: changes: new storage or an in-place write, which bumps its version counter).  Costs
    #: about one more copy of the factors in memory; set ``False`` to rebuild them per call.
    #: Writes through ``.data``, and in-place writes to inference tensors, bypass the version
    #: counter: call :meth:`clear_cache` after them.
    cache_operands: bool = True

    def _tensor(self, name: str) -> torch.Tensor:
        """The stored core / factor / bias tensor ``name`` as the forward reads it (the one
        place a storage subclass, e.g. quantized, converts it)."""
        return getattr(self, name)

    def clear_cache(self) -> None:
        """Drop the cached grouped-GEMM operands (rebuilt on the next forward)."""
        self.__dict__.pop("_operand_cache", None)

    def _apply(self, fn, recurse=True):  # .to() / .cuda() / .half(): the cache is stale
        self.clear_cache()
        return super()._apply(fn, recurse)

    def _operands(self) -> dict[str, torch.Tensor]:
        """The grouped-GEMM operands (:func:`moecore.grouped.fused_operands`): cached in
        inference, built per call (differentiably) when a gradient is needed or under
        ``torch.compile``."""
        build = lambda: grouped.fused_operands(self._tensor, self.form, self.ranks)  # noqa: E731
        if torch.compiler.is_compiling() or not self.cache_operands:
            return build()
        stored = [*self._parameters.values(), *self._buffers.values()]
        if torch.is_grad_enabled() and any(t.requires_grad for t in stored):
            return build()
        # inference tensors (made under torch.inference_mode) have no version counter: their
        # storage is the key (in-place writes to them inside inference_mode need clear_cache())
        key = tuple((t.data_ptr(), 0 if t.is_inference() else t._version, t.dtype, t.device) for t in stored)
        cached = self.__dict__.get("_operand_cache")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = self.__dict__["_operand_cache"] = (key, build())
        return cached[1]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """``(T, H), (T, k), (T, k) -> (T, H)``; same contract as transformers' experts.
        Expert indices outside ``[0, E)`` (sentinels) contribute nothing."""
        x = hidden_states
        route = grouped.Routing(top_k_index, top_k_weights, self.num_experts, x.dtype)
        bias_gu = bias_down = None
        if self.layout.has_bias:
            bias_gu = self.layout.split_bias(self._tensor("bias_gate_up"))  # (E, F) each
            bias_down = self._tensor("bias_down")  # (E, H)
        fwd = grouped.delta_forward if self.form == "delta" else grouped.wrapper_forward
        return fwd(x, route, self._operands(), self._activation, bias_gu, bias_down)
