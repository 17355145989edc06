"""Quantized storage of the compressed experts, in any form: core and factors in b-bit groups.

The quantize / dequantize / bit-packing primitives are the HQQ library's
(``hqq.core.quantize.Quantizer``; ``method="hqq"``: half-quadratic optimized scale and zero
point, ``method="rtn"``: min/max round-to-nearest), chosen by measured CPU quality and speed
(``benchmarks/quant_libs.py``, RESULTS §5).  Nothing here re-implements them.

Storage of one quantized tensor ``name`` (a form's stored name, e.g. ``core_gate``, ``delta_a_up``), as buffers:

- ``{name}_qcodes``: HQQ's packed codes (uint8 for 8/4/2 bits, int32 holding ten 3-bit codes);
- ``{name}_qscale`` / ``{name}_qzero``: one float16 scale and zero point per group, stored as
  their int16 bit patterns so that no dtype cast (``model.to(bf16)``, ``from_pretrained(dtype=)``)
  can round them: the dequantized weights are the same in every dtype the module runs in.

Groups of ``group_size`` consecutive weights run along the input side of the core
``(d_out, d_in)`` and down each factor column (factors ``(E, d, s)`` are stored as
``(E, s, d)``), so a group never mixes the columns of ``U√S`` that differ in scale.  The flat
tensor is zero-padded to whole packed rows (counted in the bytes).

:func:`quantize_layer` turns a fitted :class:`~moecore.compressed_experts.CompressedExperts`
into a :class:`QuantizedCompressedExperts`: the core is quantized first, the factors are
refit to ``W_i − Q(C)`` where the form can (:meth:`~moecore.forms.base.Form.refit_factors`;
the delta form: whitened truncated SVD), then quantized by the form
(:meth:`~moecore.forms.base.Form.quantize_factors`; the delta form quantizes ``A`` and
re-solves ``B`` for ``Q(A)`` by exact least squares before quantizing it in turn).  The forward dequantizes on the fly (the parent's forward reads every
core/factor through attribute access, which this subclass routes to :meth:`dequantized`).

Training: quantized tensors are buffers, so ``moecore distill`` trains only float
parameters.  With ``factor_bits=None`` the factors stay float parameters and train against
the frozen quantized core.  With quantized factors, :func:`float_factors` turns them back into
float parameters (their dequantized values, so the logits do not change) for KD against the
still-quantized core, and :func:`quantize_factors` quantizes the trained factors again.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import torch
from hqq.core.quantize import Quantizer
from torch import nn

from .compressed_experts import CompressedExperts
from .config import QuantConfig
from .errors import ConfigError
from .families import ExpertsLayout
from .forms import PROJECTIONS, get_form, quantizable_forms
from .maths import decompose as dm

SUFFIXES = ("_qcodes", "_qscale", "_qzero")
_ROW_MULTIPLE = {8: 1, 4: 2, 3: 1, 2: 4, 1: 8}  # HQQ packs 2 (4-bit) / 4 (2-bit) / 8 (1-bit) rows per byte row
_F16 = torch.float16


def _packing(bits: int) -> str:
    return Quantizer.bit_to_packing[bits]


def packed_layout(numel: int, bits: int, group: int) -> tuple[tuple[int, int], torch.dtype, int]:
    """``(codes shape, codes dtype, groups)`` of a tensor of ``numel`` weights once packed by HQQ
    (rows of ``group`` codes, padded to whole packed rows)."""
    rows = math.ceil(numel / (group * _ROW_MULTIPLE[bits])) * _ROW_MULTIPLE[bits]  # groups
    if bits == 3:
        return (math.ceil(rows / 10), group), torch.int32, rows
    return (rows * bits // 8, group), torch.uint8, rows


def _stored_view(t: torch.Tensor, kind: str) -> torch.Tensor:
    """The orientation whose consecutive elements form a group: core as is, factors ``(E, s, d)``."""
    return t.mT if kind == "factor" else t


def quantize(t: torch.Tensor, bits: int, group: int, method: str = "hqq", kind: str = "core") -> dict[str, torch.Tensor]:
    """Quantize ``t`` with HQQ into ``{"qcodes", "qscale", "qzero"}`` (see the module docstring).
    ``kind="factor"`` groups down the columns of ``t (E, d, s)``."""
    flat = _stored_view(t.detach(), kind).to(torch.float32).contiguous().reshape(-1)
    (codes_shape, _, rows) = packed_layout(flat.numel(), bits, group)
    flat = torch.nn.functional.pad(flat, (0, rows * group - flat.numel()))
    codes, meta = Quantizer.quantize(flat.reshape(rows, group), nbits=bits, group_size=group, optimize=method == "hqq",
                                     axis=1, bitpack=True, compute_dtype=torch.float32, device=flat.device.type)
    assert tuple(codes.shape) == codes_shape, (codes.shape, codes_shape)
    as_bits = lambda x: x.reshape(rows, 1).to(_F16).view(torch.int16)  # noqa: E731
    return {"qcodes": codes, "qscale": as_bits(meta["scale"]), "qzero": as_bits(meta["zero"])}


def dequantize(q: Mapping[str, torch.Tensor], shape: tuple[int, ...], bits: int, kind: str = "core",
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize`: ``(codes − zero)·scale`` via HQQ's unpacking, as ``dtype``
    in the logical ``shape``."""
    scale, zero = q["qscale"].view(_F16).float(), q["qzero"].view(_F16).float()  # (rows, 1)
    codes = Quantizer.unpack[_packing(bits)](q["qcodes"], dtype=torch.float32)[: scale.shape[0]]  # (rows, group)
    flat = ((codes - zero) * scale).reshape(-1)
    view_shape = (*shape[:-2], shape[-1], shape[-2]) if kind == "factor" else tuple(shape)
    w = flat[: math.prod(shape)].reshape(view_shape)
    return _stored_view(w, kind).to(dtype).contiguous()


class QuantizedCompressedExperts(CompressedExperts):
    """:class:`CompressedExperts` (any quantizable form) whose core and/or factors are stored quantized
    (``quant.core_bits`` / ``quant.factor_bits``; ``None`` keeps that part a float parameter).

    Constructible from shapes alone (meta device for loading); the forward, ``expert_weights``
    and ``materialize`` see the dequantized tensors (in the module's float dtype).
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, form: str,
                 ranks: Mapping[str, int], layout: ExpertsLayout, quant: QuantConfig, act_fn: nn.Module | None = None,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__(num_experts, hidden_size, intermediate_size, form, ranks, layout, act_fn, dtype, device)
        self.quant = QuantConfig.coerce(quant)
        self._float_dtype = dtype or torch.get_default_dtype()
        self.quantized: dict[str, tuple[int, tuple[int, ...]]] = {}  # name -> (bits, logical shape)
        form = self.form_impl
        for p in PROJECTIONS:
            for name in (form.core_name(p), *form.param_names(p)):  # a form's integer index tensors stay as they are
                bits = self.quant.core_bits if name in self.core_names else self.quant.factor_bits
                if bits is None:
                    continue
                shape = tuple(self._parameters.pop(name).shape)
                codes_shape, codes_dtype, rows = packed_layout(math.prod(shape), bits, self.quant.group_size)
                self.register_buffer(f"{name}_qcodes", torch.zeros(codes_shape, dtype=codes_dtype, device=device))
                for s in ("_qscale", "_qzero"):
                    self.register_buffer(name + s, torch.zeros(rows, 1, dtype=torch.int16, device=device))
                self.quantized[name] = (bits, shape)

    def __getattr__(self, name: str):
        quantized = self.__dict__.get("quantized")
        if quantized is not None and name in quantized:
            return self.dequantized(name)
        return super().__getattr__(name)

    def dequantized(self, name: str) -> torch.Tensor:
        """The dequantized tensor ``name`` (e.g. ``core_gate (F, H)``) in the module's float dtype."""
        bits, shape = self.quantized[name]
        q = {s[1:]: self._buffers[name + s] for s in SUFFIXES}
        return dequantize(q, shape, bits, self._kind(name), self._float_dtype)

    def check_stored(self, path: str) -> None:
        """As the parent's, and for each quantized tensor: codes of the packed dtype and shape
        its bits and group give, scales and zero points finite as float16 (NaN there would make
        every weight of the group NaN)."""
        super().check_stored(path)
        for name, (bits, shape) in self.quantized.items():
            codes_shape, codes_dtype, rows = packed_layout(math.prod(shape), bits, self.quant.group_size)
            codes = self._buffers[name + "_qcodes"]
            if codes.dtype != codes_dtype or tuple(codes.shape) != codes_shape:
                raise ValueError(f"{path}.{name}_qcodes is {codes.dtype} {tuple(codes.shape)}, expected {codes_dtype} "
                                 f"{codes_shape} for {bits}-bit groups of {self.quant.group_size}")
            for suffix in ("_qscale", "_qzero"):
                t = self._buffers[name + suffix]
                if t.dtype != torch.int16 or tuple(t.shape) != (rows, 1):
                    raise ValueError(f"{path}.{name}{suffix} is {t.dtype} {tuple(t.shape)}, expected int16 ({rows}, 1)")
                if t.device.type != "meta" and not bool(torch.isfinite(t.view(_F16)).all()):
                    raise ValueError(f"{path}.{name}{suffix} holds NaN or infinite values")

    def _kind(self, name: str) -> str:
        """How ``name`` is grouped (:func:`quantize`): ``"core"`` or ``"factor"``."""
        return "core" if name in self.core_names else "factor"

    def logical_tensors(self) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
        """As the parent's, a quantized tensor being one entry stored as its codes, scales
        and zero points."""
        out = super().logical_tensors()
        for name, (_bits, shape) in self.quantized.items():
            parts = tuple(name + s for s in SUFFIXES)
            for part in parts:
                out.pop(part)
            out[name] = (shape, parts)
        return out

    def set_quantized(self, name: str, q: Mapping[str, torch.Tensor]) -> None:
        """Store the output of :func:`quantize` for ``name`` (shapes must match)."""
        for s in SUFFIXES:
            self._buffers[name + s].copy_(q[s[1:]])

    def _apply(self, fn, recurse: bool = True):
        """Track the float dtype through ``.to(dtype)`` / ``.half()`` (codes and scales are integers)."""
        out = super()._apply(fn, recurse)
        probe = fn(torch.empty(0, dtype=self._float_dtype))
        if probe.is_floating_point():
            self._float_dtype = probe.dtype
        return out

    def extra_repr(self) -> str:
        q = self.quant
        return super().extra_repr() + f", core_bits={q.core_bits}, factor_bits={q.factor_bits}, group={q.group_size}, method={q.method}"


def build_experts(num_experts: int, hidden_size: int, intermediate_size: int, form: str, ranks: Mapping[str, int],
                  layout: ExpertsLayout, quant: QuantConfig | dict | None = None, **kw) -> CompressedExperts:
    """A :class:`CompressedExperts`, or a :class:`QuantizedCompressedExperts` when ``quant`` is set
    (what the loader rebuilds from a checkpoint's ``quantization_config``)."""
    quant = QuantConfig.coerce(quant)
    if quant is None:
        return CompressedExperts(num_experts, hidden_size, intermediate_size, form, ranks, layout, **kw)
    if not get_form(form).quantizable:
        raise ConfigError(f"quantized storage needs form {' or '.join(map(repr, quantizable_forms()))}, got {form!r}")
    return QuantizedCompressedExperts(num_experts, hidden_size, intermediate_size, form, ranks, layout, quant, **kw)


@torch.no_grad()
def quantize_layer(module: CompressedExperts, weights: Mapping[str, torch.Tensor],
                   grams: Mapping[str, torch.Tensor | None], quant: QuantConfig, damping: float = 0.01,
                   refit: bool = True) -> QuantizedCompressedExperts:
    """Quantize a fitted layer: ``Q(C)``; the factors refit to ``W_i − Q(C)`` where the form
    can (:meth:`~moecore.forms.base.Form.refit_factors`, whitened when ``grams[p]`` is given);
    then quantized by the form (:meth:`~moecore.forms.base.Form.quantize_factors`; delta:
    ``Q(A)``, ``B`` re-solved for ``Q(A)``, ``Q(B)``).

    ``weights[p] (E, d_out, d_in)`` are the original experts, ``grams[p] (E, d_in, d_in)`` or
    ``None``.  ``refit=False`` quantizes the given core and factors as they are (ablation).
    ``module.report[p]`` gains the errors of the quantized weights (``weight_rel_error``,
    ``output_rel_error``) and keeps the float fit's as ``float_weight_rel_error`` / ...
    """
    quant = QuantConfig.coerce(quant)
    form = module.form_impl
    if not form.quantizable:
        raise ConfigError(f"quantize_layer needs a layer of form {' or '.join(map(repr, quantizable_forms()))}, "
                          f"got {module.form!r}")
    ref = getattr(module, form.core_name("gate"))
    out = QuantizedCompressedExperts(module.num_experts, module.hidden_size, module.intermediate_size, module.form,
                                     module.ranks, module.layout, quant, act_fn=module.act_fn, dtype=ref.dtype,
                                     device=ref.device)
    g, cb, fb, method = quant.group_size, quant.core_bits, quant.factor_bits, quant.method
    report = {p: dict(v) for p, v in (module.report or {}).items()}
    for p in PROJECTIONS:
        w, gram = weights[p].to(torch.float64), grams.get(p)
        core_name, names = form.core_name(p), form.param_names(p)
        core = getattr(module, core_name).detach().to(torch.float64)
        factors = tuple(getattr(module, n).detach().to(torch.float64) for n in names)
        index = tuple(getattr(module, n) for n in form.index_param_names(p))  # e.g. per-expert ranks, kept as they are
        for n, t in zip(form.index_param_names(p), index):
            getattr(out, n).copy_(t)
        refitted = cb is None
        if cb is not None:
            qc = quantize(core, cb, g, method, "core")
            out.set_quantized(core_name, qc)
            core = dequantize(qc, tuple(core.shape), cb, "core", torch.float64)  # (d_out, d_in)
            if refit:  # the factors absorb the core's rounding error
                new = form.refit_factors(w, core, module.ranks[p], gram, damping)
                factors, refitted = (factors, False) if new is None else (tuple(new), True)
        if fb is not None:
            codes: dict[str, dict[str, torch.Tensor]] = {}

            def quantize_factor(i: int, t: torch.Tensor) -> torch.Tensor:
                codes[names[i]] = q = quantize(t, fb, g, method, "factor")
                return dequantize(q, tuple(t.shape), fb, "factor", torch.float64)  # (E, d, s)

            factors = form.quantize_factors(factors, quantize_factor, residual=w - core if refit else None,
                                            resolve=refit)
            for name in names:
                out.set_quantized(name, codes[name])
        for name, t in zip((core_name, *names), (core, *factors)):
            if name not in out.quantized:
                getattr(out, name).copy_(t)
        approx = form.reconstruct(core, (*factors, *index))  # (E, d_out, d_in)
        entry = report.setdefault(p, {"rank": module.ranks[p]})
        for key in ("weight_rel_error", "output_rel_error"):
            if key in entry:
                entry[f"float_{key}"] = entry[key]
        entry["weight_rel_error"] = dm.relative_weight_error(w, approx)
        entry["output_rel_error"] = dm.relative_output_error(w, approx, gram) if gram is not None else None
        entry["quant_refit"] = bool(refit and refitted)
    if module.layout.has_bias:
        out.bias_gate_up.copy_(module.bias_gate_up)
        out.bias_down.copy_(module.bias_down)
    out.report = report
    out.train(module.training)
    return out


def _quantized_modules(model: nn.Module) -> list[QuantizedCompressedExperts]:
    return [m for m in model.modules() if isinstance(m, QuantizedCompressedExperts)]


@torch.no_grad()
def float_factors(model: nn.Module) -> int:
    """Make every quantized factor a float ``nn.Parameter`` holding its dequantized value (the
    core stays quantized, i.e. frozen), e.g. before ``moecore distill``; ``quant.factor_bits``
    becomes ``None`` so a save records float factors.  Returns the number of modules changed."""
    changed = 0
    for m in _quantized_modules(model):
        names = [n for n in m.quantized if n not in m.core_names]
        if not names:
            continue
        if m.quant.core_bits is None:
            raise ConfigError("float_factors would leave nothing quantized (core_bits is None)")
        for name in names:
            value = m.dequantized(name)
            for s in SUFFIXES:
                del m._buffers[name + s]
            del m.quantized[name]
            m.register_parameter(name, nn.Parameter(value))
        m.quant = dataclasses.replace(m.quant, factor_bits=None)
        m.clear_cache()  # the forward's cached operands were built from the old storage
        changed += 1
    return changed


@torch.no_grad()
def quantize_factors(model: nn.Module, factor_bits: int) -> int:
    """Quantize the float factors of every :class:`QuantizedCompressedExperts` (e.g. after KD),
    by its form (:meth:`~moecore.forms.base.Form.quantize_factors`; delta: ``Q(A)``; ``B``
    re-solved so that ``Q(A) Bᵀ`` is the least-squares fit of the trained ``A Bᵀ``; ``Q(B)``).
    Returns the number of modules changed."""
    changed = 0
    for m in _quantized_modules(model):
        if m.quant.factor_bits is not None:
            continue
        quant = dataclasses.replace(m.quant, factor_bits=factor_bits)
        g, method = quant.group_size, quant.method
        form = m.form_impl
        for p in PROJECTIONS:
            names = form.param_names(p)
            factors = tuple(getattr(m, n).detach().to(torch.float64) for n in names)
            codes: dict[str, tuple[dict[str, torch.Tensor], tuple[int, ...]]] = {}

            def quantize_factor(i: int, t: torch.Tensor) -> torch.Tensor:
                q = quantize(t, factor_bits, g, method, "factor")
                codes[names[i]] = q, tuple(t.shape)
                return dequantize(q, tuple(t.shape), factor_bits, "factor", torch.float64)

            form.quantize_factors(factors, quantize_factor)  # delta: B re-solved for Q(A) against the trained A Bᵀ
            for name in names:
                q, shape = codes[name]
                del m._parameters[name]
                for s in SUFFIXES:
                    m.register_buffer(name + s, q[s[1:]])
                m.quantized[name] = (factor_bits, shape)
        m.quant = quant
        m.clear_cache()  # the forward's cached operands were built from the old storage
        changed += 1
    return changed
