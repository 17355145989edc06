"""Quantized storage of the compressed experts, in any form: core and factors in b-bit groups.

The quantize / dequantize / bit-packing primitives are the HQQ library's
(``method="hqq"``: half-quadratic optimized scale and zero point, ``method="rtn"``: min/max
round-to-nearest), chosen by measured CPU quality and speed (``benchmarks/quant_libs.py``,
RESULTS §5), wrapped with the stored layout (``{name}_qcodes`` / ``_qscale`` / ``_qzero``) in
:mod:`moecore.maths.quantize`.  A quantized layer is a plain
:class:`~moecore.compressed_experts.CompressedExperts` built with ``quant=`` (same class, same
forward: its ``stored`` hook dequantizes), as torchao swaps the weights, not the module.

:func:`quantize_layer` turns a fitted :class:`~moecore.compressed_experts.CompressedExperts`
into one with quantized storage: the core is quantized first, the factors are
refit to ``W_i − Q(C)`` where the form can (:meth:`~moecore.forms.base.Form.refit_factors`;
the delta form: whitened truncated SVD), then quantized by the form
(:meth:`~moecore.forms.base.Form.quantize_factors`; the delta form quantizes ``A`` and
re-solves ``B`` for ``Q(A)`` by exact least squares before quantizing it in turn).  The forward dequantizes on the fly.

Training: quantized tensors are buffers, so ``moecore distill`` trains only float
parameters.  With ``factor_bits=None`` the factors stay float parameters and train against
the frozen quantized core.  With quantized factors, :func:`float_factors` turns them back into
float parameters (their dequantized values, so the logits do not change) for KD against the
still-quantized core, and :func:`quantize_factors` quantizes the trained factors again.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import torch
from torch import nn

from .compressed_experts import CompressedExperts
from .config import QuantConfig
from .errors import ConfigError
from .forms import PROJECTIONS, quantizable_forms
from .maths import decompose as dm
from .maths.quantize import SUFFIXES, dequantize, packed_layout, quantize

__all__ = ["SUFFIXES", "dequantize", "float_factors", "packed_layout", "quantize",
           "quantize_factors", "quantize_layer"]


@torch.no_grad()
def quantize_layer(module: CompressedExperts, weights: Mapping[str, torch.Tensor],
                   grams: Mapping[str, torch.Tensor | None], quant: QuantConfig, damping: float = 0.01,
                   refit: bool = True) -> CompressedExperts:
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
    ref = module.stored(form.core_name("gate"))
    out = CompressedExperts(module.num_experts, module.hidden_size, module.intermediate_size, module.form,
                            module.ranks, module.layout, act_fn=module.act_fn, dtype=ref.dtype, device=ref.device,
                            quant=quant)
    g, cb, fb, method = quant.group_size, quant.core_bits, quant.factor_bits, quant.method
    report = {p: dict(v) for p, v in (module.report or {}).items()}
    for p in PROJECTIONS:
        w, gram = weights[p].to(torch.float64), grams.get(p)
        core_name, names = form.core_name(p), form.param_names(p)
        core = module.stored(core_name).detach().to(torch.float64)
        factors = tuple(module.stored(n).detach().to(torch.float64) for n in names)
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


def _quantized_modules(model: nn.Module) -> list[CompressedExperts]:
    return [m for m in model.modules() if isinstance(m, CompressedExperts) and m.quant is not None]


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
            m.unquantize_stored(name)
        m.quant = dataclasses.replace(m.quant, factor_bits=None)
        changed += 1
    return changed


@torch.no_grad()
def quantize_factors(model: nn.Module, factor_bits: int) -> int:
    """Quantize the float factors of every experts module with quantized storage (e.g. after KD),
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
            codes: dict[str, dict[str, torch.Tensor]] = {}

            def quantize_factor(i: int, t: torch.Tensor) -> torch.Tensor:
                codes[names[i]] = q = quantize(t, factor_bits, g, method, "factor")
                return dequantize(q, tuple(t.shape), factor_bits, "factor", torch.float64)

            form.quantize_factors(factors, quantize_factor)  # delta: B re-solved for Q(A) against the trained A Bᵀ
            for name in names:
                m.quantize_stored(name, codes[name], factor_bits)
        m.quant = quant
        changed += 1
    return changed
