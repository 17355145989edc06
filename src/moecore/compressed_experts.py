"""``CompressedExperts``: the drop-in replacement of a transformers experts module.

Forward keeps the transformers 5.x experts signature
``(hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k)) -> (T, H)``.
Stored parameter names are chosen to be safe from transformers' checkpoint key rewriting
(docs/ARCHITECTURE.md): the form's (:meth:`~moecore.forms.base.Form.stored_names`: ``core_{p}``
and its factors, e.g. ``delta_a_{p}``/``delta_b_{p}``), ``bias_gate_up``/``bias_down``.

Everything that depends on the form (factor names and shapes, counts, reconstruction,
grouped-GEMM operands and forward) is the form object's (:mod:`moecore.forms`).

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
from .forms import FORMS, PROJECTIONS, Form, get_form
from .maths import budget

__all__ = ["CompressedExperts", "PROJECTIONS"]


class CompressedExperts(nn.Module):
    """Shared-core experts of one MoE layer, in one of the registered forms (:mod:`moecore.forms`).

    Constructible from shapes alone (e.g. on the meta device for loading); fill it with
    :meth:`from_factors` / ``load_state_dict``.

    Args:
        num_experts, hidden_size, intermediate_size: E, H, F.
        form: a registered form name (:mod:`moecore.forms`), e.g. ``"delta"``
            (W_i = C + A_i B_iᵀ); ``ConfigError`` for an unknown one.
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
        form_impl = get_form(form)
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.form = form
        self.ranks = {p: int(ranks[p]) for p in PROJECTIONS}
        self.layout = layout
        self.act_fn = act_fn
        self._activation = layout.activation_fn(act_fn)
        self.report: dict = {}
        kw = {"dtype": dtype, "device": device}
        e, h, f = num_experts, hidden_size, intermediate_size
        self.core_names = tuple(form_impl.core_name(p) for p in PROJECTIONS)
        for p in PROJECTIONS:
            d_out, d_in = self.proj_shape(p)
            self.register_parameter(form_impl.core_name(p), nn.Parameter(torch.zeros(d_out, d_in, **kw)))
            for name, shape in zip(form_impl.param_names(p), form_impl.factor_shapes(e, d_out, d_in, self.ranks[p])):
                self.register_parameter(name, nn.Parameter(torch.zeros(shape, **kw)))
            for name in form_impl.index_param_names(p):  # e.g. per-expert ranks: (E,) int32
                self.register_buffer(name, torch.zeros(e, dtype=torch.int32, device=device))
        if layout.has_bias:
            self.bias_gate_up = nn.Parameter(torch.zeros(e, 2 * f, **kw))
            self.bias_down = nn.Parameter(torch.zeros(e, h, **kw))

    # ------------------------------------------------------------------ shapes / stats
    @property
    def form_impl(self) -> Form:
        """The :class:`~moecore.forms.Form` object of :attr:`form`."""
        return FORMS[self.form]

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
        return budget.active_macs_per_token(self.form_impl, self.projection_shapes(),
                                            {("", p): r for p, r in self.ranks.items()}, top_k)

    def logical_tensors(self) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
        """Each core / factor / bias this module stores, by name: ``(its logical shape, the names
        it is stored under)`` (itself here; several for a quantized one, :mod:`moecore.quant`).
        What :mod:`moecore.stats` counts, with no knowledge of the form or the storage."""
        skip = self._non_persistent_buffers_set
        own = {**self._parameters, **{n: b for n, b in self._buffers.items() if n not in skip}}
        return {n: (tuple(t.shape), (n,)) for n, t in own.items() if t is not None}

    def check_stored(self, path: str) -> None:
        """Load-time check of the stored tensors (``path`` names this module in messages): every
        core, factor and bias is floating point and finite.  ``ValueError`` naming the first that
        is not, or the form's index tensors that do not fit (the loader turns it into a ``CheckpointError``)."""
        form = self.form_impl
        for p in PROJECTIONS:
            if form.index_names and (why := form.check_index(self._tensor, p, self.num_experts, self.ranks[p])):
                raise ValueError(f"{path}.{why}")
        index = {n for p in PROJECTIONS for n in form.index_param_names(p)}
        for name, (_shape, parts) in self.logical_tensors().items():
            if parts == (name,) and name not in index:
                t = getattr(self, name)
                if not t.is_floating_point():
                    raise ValueError(f"{path}.{name} is stored as {t.dtype}, not a float dtype")
                if t.device.type != "meta" and not bool(torch.isfinite(t).all()):
                    raise ValueError(f"{path}.{name} holds NaN or infinite values")

    def trainable_parameters(self, train_core: bool = False) -> list[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` that training updates: the form's float factors and, with
        ``train_core``, the cores (biases and quantized tensors, which are buffers, never):
        found from the form's stored names, as peft finds its adapters by module."""
        form = self.form_impl
        names = [n for p in PROJECTIONS for n in form.param_names(p)]
        if train_core:
            names += list(self.core_names)
        return [(n, self._parameters[n]) for n in names if self._parameters.get(n) is not None]

    def extra_repr(self) -> str:
        return f"form={self.form}, E={self.num_experts}, H={self.hidden_size}, F={self.intermediate_size}, ranks={self.ranks}, layout={self.layout.name}"

    # ------------------------------------------------------------------ building
    @classmethod
    def from_factors(
        cls, layout: ExpertsLayout, form: str, cores: Mapping[str, torch.Tensor], factors: Mapping[str, tuple],
        biases: Mapping[str, torch.Tensor] | None = None, act_fn: nn.Module | None = None,
        dtype: torch.dtype | None = None, device: torch.device | str | None = None,
    ) -> "CompressedExperts":
        """Build from computed factors: ``cores[p] (d_out, d_in)``; ``factors[p]`` in the
        form's :attr:`~moecore.forms.Form.factor_names` order (``(A, B)`` for delta,
        ``(U_in, V_in, U_out, V_out)`` for wrapper); ``biases`` has
        ``bias_gate_up (E, 2F)`` / ``bias_down (E, H)`` for biased layouts."""
        f, h = cores["gate"].shape
        e = factors["gate"][0].shape[0]
        form_impl = get_form(form)
        stored = {p: form_impl.to_stored(e, tuple(factors[p])) for p in PROJECTIONS}  # (rank, tensors)
        ranks = {p: stored[p][0] for p in PROJECTIONS}
        dtype = dtype or cores["gate"].dtype
        m = cls(e, h, f, form, ranks, layout, act_fn=act_fn, dtype=dtype, device=device)
        with torch.no_grad():
            for p in PROJECTIONS:
                getattr(m, m.form_impl.core_name(p)).copy_(cores[p])
                for n, t in zip(m.form_impl.factor_tensor_names(p), stored[p][1]):
                    getattr(m, n).copy_(t)
            if layout.has_bias:
                m.bias_gate_up.copy_(biases["bias_gate_up"])
                m.bias_down.copy_(biases["bias_down"])
        return m

    # ------------------------------------------------------------------ weights
    def expert_weights(self, p: str) -> torch.Tensor:
        """Dense ``(E, d_out, d_in)`` weights of projection ``p`` reconstructed from the factors."""
        form = self.form_impl
        return form.reconstruct(getattr(self, form.core_name(p)), tuple(getattr(self, n) for n in form.factor_tensor_names(p)))

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
        """The grouped-GEMM operands (the form's :meth:`~moecore.forms.Form.fused_operands`): cached in
        inference, built per call (differentiably) when a gradient is needed or under
        ``torch.compile``."""
        build = lambda: self.form_impl.fused_operands(self._tensor, self.ranks)  # noqa: E731
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

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor | None = None,
                top_k_weights: torch.Tensor | None = None) -> torch.Tensor:
        """``(T, H), (T, k), (T, k) -> (T, H)``; same contract as transformers' experts.
        Expert indices outside ``[0, E)`` (sentinels) contribute nothing.  Layouts called
        densely (Llama-4, :attr:`~moecore.families.ExpertsLayout.call`) take ``(E·T, H)`` alone."""
        x, top_k_index, top_k_weights = self.layout.routed_call(hidden_states, top_k_index, top_k_weights,
                                                                self.num_experts)
        return self.routed(x, top_k_index, top_k_weights)

    def routed(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """``(N, H), (N, k), (N, k) -> (N, H)``: the forward on routed pairs, whatever the
        layout's call convention (what :meth:`forward` runs after
        :meth:`~moecore.families.ExpertsLayout.routed_call`)."""
        route = grouped.Routing(top_k_index, top_k_weights, self.num_experts, x.dtype)
        bias_gu = bias_down = None
        if self.layout.has_bias:
            bias_gu = self.layout.split_bias(self._tensor("bias_gate_up"))  # (E, F) each
            bias_down = self._tensor("bias_down")  # (E, H)
        return self.form_impl.forward(x, route, self._operands(), self._activation, bias_gu, bias_down)
