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

Quantized storage (``quant``, torchao's model: the storage changes, not the class or the
forward): a quantized core / factor ``name`` is kept as the buffers ``{name}_qcodes``,
``{name}_qscale``, ``{name}_qzero`` (:mod:`moecore.maths.quantize`) instead of a parameter,
and :meth:`CompressedExperts.stored`, the one place the forward reads a stored tensor,
dequantizes it.  :mod:`moecore.quant` fits and fills them.
"""
from __future__ import annotations

import copy
import math
from typing import Mapping

import torch
from torch import nn

from . import grouped
from .config import QuantConfig
from .errors import ConfigError
from .families import ExpertsLayout
from .forms import FORMS, PROJECTIONS, Form, get_form, quantizable_forms
from .maths import budget
from .maths import quantize as mq

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
        quant: quantized storage (:class:`~moecore.config.QuantConfig`): the cores
            (``core_bits``) and factors (``factor_bits``) stored in b-bit groups; ``None``
            (default) or a part's bits ``None`` keeps that part a float parameter.
    """

    moecore_compressed = True  # what :func:`moecore.families.is_compressed` looks for

    def __init__(
        self, num_experts: int, hidden_size: int, intermediate_size: int, form: str, ranks: Mapping[str, int],
        layout: ExpertsLayout, act_fn: nn.Module | None = None, dtype: torch.dtype | None = None,
        device: torch.device | str | None = None, quant: QuantConfig | dict | None = None,
    ) -> None:
        super().__init__()
        form_impl = get_form(form)
        self.quant = QuantConfig.coerce(quant)
        if self.quant is not None and not form_impl.quantizable:
            raise ConfigError(f"quantized storage needs form {' or '.join(map(repr, quantizable_forms()))}, "
                              f"got {form!r}")
        self.quantized: dict[str, tuple[int, tuple[int, ...]]] = {}  # name -> (bits, logical shape)
        if self.quant is not None:
            self._float_dtype = dtype or torch.get_default_dtype()  # what quantized tensors dequantize to
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
            shapes = {form_impl.core_name(p): (d_out, d_in),
                      **dict(zip(form_impl.param_names(p), form_impl.factor_shapes(e, d_out, d_in, self.ranks[p])))}
            for name, shape in shapes.items():
                bits = self._bits(name)
                if bits is None:
                    self.register_parameter(name, nn.Parameter(torch.zeros(shape, **kw)))
                else:
                    self._register_codes(name, bits, tuple(shape), device)
            for name in form_impl.index_param_names(p):  # e.g. per-expert ranks: (E,) int32
                self.register_buffer(name, torch.zeros(e, dtype=torch.int32, device=device))
        if layout.has_bias:
            self.bias_gate_up = nn.Parameter(torch.zeros(e, 2 * f, **kw))
            self.bias_down = nn.Parameter(torch.zeros(e, h, **kw))

    # ------------------------------------------------------------------ quantized storage
    def _bits(self, name: str) -> int | None:
        """Bits ``quant`` stores the core / factor ``name`` in (``None``: float)."""
        if self.quant is None:
            return None
        return self.quant.core_bits if name in self.core_names else self.quant.factor_bits

    def _kind(self, name: str) -> str:
        """How ``name`` is grouped (:func:`moecore.maths.quantize.quantize`): ``"core"`` or ``"factor"``."""
        return "core" if name in self.core_names else "factor"

    def _register_codes(self, name: str, bits: int, shape: tuple[int, ...], device, q=None) -> None:
        codes_shape, codes_dtype, rows = mq.packed_layout(math.prod(shape), bits, self.quant.group_size)
        self.register_buffer(f"{name}_qcodes", q["qcodes"] if q else torch.zeros(codes_shape, dtype=codes_dtype,
                                                                                  device=device))
        for s in mq.SUFFIXES[1:]:  # scale and zero point: one float16 (as int16 bits) per group
            self.register_buffer(name + s, q[s[1:]] if q else torch.zeros(rows, 1, dtype=torch.int16, device=device))
        self.quantized[name] = (bits, shape)

    @property
    def float_dtype(self) -> torch.dtype:
        """The dtype the cores and factors are read in (quantized ones dequantize to it)."""
        if self.quant is not None:
            return self._float_dtype
        return next(t.dtype for t in self._parameters.values() if t is not None and t.is_floating_point())

    def dequantized(self, name: str) -> torch.Tensor:
        """The quantized tensor ``name`` (e.g. ``core_gate (F, H)``) dequantized, in the module's float dtype."""
        bits, shape = self.quantized[name]
        q = {s[1:]: self._buffers[name + s] for s in mq.SUFFIXES}
        return mq.dequantize(q, shape, bits, self._kind(name), self._float_dtype)

    def set_quantized(self, name: str, q: dict[str, torch.Tensor]) -> None:
        """Store :func:`~moecore.maths.quantize.quantize`'s output for the quantized ``name`` (shapes must match)."""
        for s in mq.SUFFIXES:
            self._buffers[name + s].copy_(q[s[1:]])

    def quantize_stored(self, name: str, q: dict[str, torch.Tensor], bits: int) -> None:
        """Replace the float parameter ``name`` by the quantized codes ``q`` (``bits`` bits)."""
        shape = tuple(self._parameters.pop(name).shape)
        self._register_codes(name, bits, shape, None, q)
        self.clear_cache()

    def unquantize_stored(self, name: str) -> None:
        """Replace the quantized ``name`` by a float parameter holding its dequantized value."""
        value = self.dequantized(name)
        for s in mq.SUFFIXES:
            del self._buffers[name + s]
        del self.quantized[name]
        self.register_parameter(name, nn.Parameter(value))
        self.clear_cache()

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
        out = {n: (tuple(t.shape), (n,)) for n, t in own.items() if t is not None}
        for name, (_bits, shape) in self.quantized.items():  # one entry, stored as codes, scales and zero points
            parts = tuple(name + s for s in mq.SUFFIXES)
            for part in parts:
                out.pop(part)
            out[name] = (shape, parts)
        return out

    def check_stored(self, path: str) -> None:
        """Load-time check of the stored tensors (``path`` names this module in messages): every
        core, factor and bias is floating point and finite.  ``ValueError`` naming the first that
        is not, or the form's index tensors that do not fit (the loader turns it into a ``CheckpointError``)."""
        form = self.form_impl
        for p in PROJECTIONS:
            if form.index_names and (why := form.check_index(self.stored, p, self.num_experts, self.ranks[p])):
                raise ValueError(f"{path}.{why}")
        index = {n for p in PROJECTIONS for n in form.index_param_names(p)}
        for name, (_shape, parts) in self.logical_tensors().items():
            if parts == (name,) and name not in index:
                t = getattr(self, name)
                if not t.is_floating_point():
                    raise ValueError(f"{path}.{name} is stored as {t.dtype}, not a float dtype")
                if t.device.type != "meta" and not bool(torch.isfinite(t).all()):
                    raise ValueError(f"{path}.{name} holds NaN or infinite values")
        for name, (bits, shape) in self.quantized.items():  # packed dtype and shape, finite float16 scales
            codes_shape, codes_dtype, rows = mq.packed_layout(math.prod(shape), bits, self.quant.group_size)
            codes = self._buffers[name + "_qcodes"]
            if codes.dtype != codes_dtype or tuple(codes.shape) != codes_shape:
                raise ValueError(f"{path}.{name}_qcodes is {codes.dtype} {tuple(codes.shape)}, expected {codes_dtype} "
                                 f"{codes_shape} for {bits}-bit groups of {self.quant.group_size}")
            for suffix in mq.SUFFIXES[1:]:
                t = self._buffers[name + suffix]
                if t.dtype != torch.int16 or tuple(t.shape) != (rows, 1):
                    raise ValueError(f"{path}.{name}{suffix} is {t.dtype} {tuple(t.shape)}, expected int16 ({rows}, 1)")
                if t.device.type != "meta" and not bool(torch.isfinite(t.view(torch.float16)).all()):
                    raise ValueError(f"{path}.{name}{suffix} holds NaN or infinite values")

    def trainable_parameters(self, train_core: bool = False) -> list[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` that training updates: the form's float factors and, with
        ``train_core``, the cores (biases and quantized tensors, which are buffers, never):
        found from the form's stored names, as peft finds its adapters by module."""
        form = self.form_impl
        names = [n for p in PROJECTIONS for n in form.param_names(p)]
        if train_core:
            names += list(self.core_names)
        return [(n, self._parameters[n]) for n in names if self._parameters.get(n) is not None]

    def training_copy(self, dtype: torch.dtype) -> tuple["CompressedExperts", dict[str, str]]:
        """A copy of this module to train in ``dtype``, stored in its form's
        :attr:`~moecore.forms.Form.training_form` (e.g. the ragged form's factors padded, as the
        delta form), and ``{stored name: the copy's name}`` of every core and float factor.
        :meth:`load_trained` writes the trained values back."""
        form = self.form_impl
        trained_as = get_form(form.training_form or form.name)
        names = {n: n for n in self.core_names}
        if trained_as is form or self.quant is not None:
            names.update((n, n) for p in PROJECTIONS for n in form.param_names(p))
            return copy.deepcopy(self).to(dtype), names
        for p in PROJECTIONS:
            names.update(zip(form.param_names(p), trained_as.param_names(p)))
        with torch.no_grad():
            biases = {n: self.stored(n) for n in ("bias_gate_up", "bias_down")} if self.layout.has_bias else None
            work = CompressedExperts.from_factors(
                self.layout, trained_as.name, {p: self.stored(form.core_name(p)) for p in PROJECTIONS},
                {p: form.to_training(self.stored, p) for p in PROJECTIONS}, biases, act_fn=self.act_fn,
                dtype=dtype, device=self.stored(self.core_names[0]).device)
        return work, names

    @torch.no_grad()
    def load_trained(self, work: "CompressedExperts", names: Mapping[str, str], trained: list[str]) -> None:
        """Copy the ``trained`` stored tensors back from :meth:`training_copy`'s ``work``
        (``names`` its name map), through the form's :meth:`~moecore.forms.Form.from_training`."""
        form = self.form_impl
        for p in PROJECTIONS:
            own = form.param_names(p)
            if any(n in trained for n in own):
                back = form.from_training(self.stored, p, tuple(work._parameters[names[n]] for n in own))
                for n, t in zip(own, back):
                    if n in trained:
                        self._parameters[n].copy_(t)
        for n in self.core_names:
            if n in trained:
                self._parameters[n].copy_(work._parameters[names[n]])

    def extra_repr(self) -> str:
        out = (f"form={self.form}, E={self.num_experts}, H={self.hidden_size}, F={self.intermediate_size}, "
               f"ranks={self.ranks}, layout={self.layout.name}")
        if (q := self.quant) is not None:
            out += f", core_bits={q.core_bits}, factor_bits={q.factor_bits}, group={q.group_size}, method={q.method}"
        return out

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
        e = factors["gate"][0].shape[0]
        form_impl = get_form(form)
        stored = {p: form_impl.to_stored(e, tuple(factors[p])) for p in PROJECTIONS}  # (rank, tensors)
        return cls.from_stored(layout, form, e, {p: stored[p][0] for p in PROJECTIONS}, cores,
                               {p: stored[p][1] for p in PROJECTIONS}, biases, act_fn=act_fn, dtype=dtype,
                               device=device)

    @classmethod
    def from_stored(
        cls, layout: ExpertsLayout, form: str, num_experts: int, ranks: Mapping[str, int],
        cores: Mapping[str, torch.Tensor],
        stored: Mapping[str, tuple], biases: Mapping[str, torch.Tensor] | None = None,
        act_fn: nn.Module | None = None, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
    ) -> "CompressedExperts":
        """Build from each projection's rank, core and stored tensors (in the form's
        :meth:`~moecore.forms.Form.factor_tensor_names` order, as :meth:`~moecore.forms.Form.to_stored`
        gives them); the rest as :meth:`from_factors`."""
        f, h = cores["gate"].shape
        dtype = dtype or cores["gate"].dtype
        m = cls(num_experts, h, f, form, dict(ranks), layout, act_fn=act_fn, dtype=dtype, device=device)
        with torch.no_grad():
            for p in PROJECTIONS:
                getattr(m, m.form_impl.core_name(p)).copy_(cores[p])
                for n, t in zip(m.form_impl.factor_tensor_names(p), stored[p]):
                    getattr(m, n).copy_(t)
            if layout.has_bias:
                m.bias_gate_up.copy_(biases["bias_gate_up"])
                m.bias_down.copy_(biases["bias_down"])
        return m

    # ------------------------------------------------------------------ weights
    def expert_weights(self, p: str) -> torch.Tensor:
        """Dense ``(E, d_out, d_in)`` weights of projection ``p`` reconstructed from the factors."""
        form = self.form_impl
        return form.reconstruct(self.stored(form.core_name(p)), tuple(self.stored(n) for n in form.factor_tensor_names(p)))

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

    def stored(self, name: str) -> torch.Tensor:
        """The stored core / factor / bias tensor ``name`` as the forward reads it: the one
        place quantized storage is dequantized."""
        return self.dequantized(name) if name in self.quantized else getattr(self, name)

    def clear_cache(self) -> None:
        """Drop the cached grouped-GEMM operands (rebuilt on the next forward)."""
        self.__dict__.pop("_operand_cache", None)

    def _apply(self, fn, recurse=True):  # .to() / .cuda() / .half(): the cache is stale
        self.clear_cache()
        out = super()._apply(fn, recurse)
        if self.quant is not None:  # follow the float dtype (codes and scales are integers, never cast)
            probe = fn(torch.empty(0, dtype=self._float_dtype))
            if probe.is_floating_point():
                self._float_dtype = probe.dtype
        return out

    def _operands(self) -> dict[str, torch.Tensor]:
        """The grouped-GEMM operands (the form's :meth:`~moecore.forms.Form.fused_operands`): cached in
        inference, built per call (differentiably) when a gradient is needed or under
        ``torch.compile``."""
        build = lambda: self.form_impl.fused_operands(self.stored, self.ranks)  # noqa: E731
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
            bias_gu = self.layout.split_bias(self.stored("bias_gate_up"))  # (E, F) each
            bias_down = self.stored("bias_down")  # (E, H)
        return self.form_impl.forward(x, route, self._operands(), self._activation, bias_gu, bias_down)
