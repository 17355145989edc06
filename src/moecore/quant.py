"""Quantized storage of the compressed experts, in any form: core and factors in b-bit groups.

The quantize / dequantize / bit-packing primitives are the HQQ library's
(``method="hqq"``: half-quadratic optimized scale and zero point, ``method="rtn"``: min/max
round-to-nearest), chosen by measured CPU quality and speed (``benchmarks/quant_libs.py``,
RESULTS §5), wrapped with the stored layout (``{name}_qcodes`` / ``_qscale`` / ``_qzero``) in
:mod:`moecore.maths.quantize`.  A quantized layer is a plain
:class:`~moecore.compressed_experts.CompressedExperts` built with ``quant=`` (same class, same
forward: its ``stored`` hook dequantizes), as torchao swaps the weights, not the module.

:func:`quantize_layer` turns a fitted :class:`~moecore.compressed_experts.CompressedExperts`
into one with quantized storage (the layer engine does the same one projection at a time,
:func:`quantize_projection`, with the fit's own whitening factors and a chunk of experts at a
time, then :func:`quantized_module`): the core is quantized first, the factors are
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
from .forms import PROJECTIONS, get_form, quantizable_forms
from .maths import fit as mf
from .maths.quantize import SUFFIXES, dequantize, packed_layout, quantize

__all__ = ["SUFFIXES", "dequantize", "float_factors", "packed_layout", "quantize", "quantize_factors",
           "quantize_layer", "quantize_projection", "quantized_module"]


@torch.no_grad()
def quantize_layer(module: CompressedExperts, weights: Mapping[str, torch.Tensor],
                   grams: Mapping[str, torch.Tensor | None], quant: QuantConfig, damping: float = 0.01,
                   refit: bool = True) -> CompressedExperts:
    """Quantize a fitted layer: ``Q(C)``; the factors refit to ``W_i − Q(C)`` where the form
    can (:meth:`~moecore.forms.base.Form.refit_factors`, whitened when ``grams[p]`` is given);
    then quantized by the form (:meth:`~moecore.forms.base.Form.quantize_factors`; delta:
    ``Q(A)``, ``B`` re-solved for ``Q(A)``, ``Q(B)``).

    ``weights[p] (E, d_out, d_in)`` are the original experts, ``grams[p] (E, d_in, d_in)`` or
    ``None`` (whitened here with ``damping``, as the fit does).  ``refit=False`` quantizes the
    given core and factors as they are (ablation).  ``module.report[p]`` gains the errors of the
    quantized weights (``weight_rel_error``, ``output_rel_error``) and keeps the float fit's as
    ``float_weight_rel_error`` / ...  The layer engine calls :func:`quantize_projection` itself,
    with the fit's own whitening, one projection at a time.
    """
    quant, form = QuantConfig.coerce(quant), module.form_impl
    _check_form(form, module.form)
    results = {}
    for p in PROJECTIONS:
        L = K = lam = None
        if grams.get(p) is not None:
            L = grams[p].to(torch.float64, copy=True)  # (E, d_in, d_in), whitening factors in place
            K, lam = mf.whiten_in_place(L, damping, L.shape[0], L.device)
        stored = {n: module.stored(n).detach() for n in (form.core_name(p), *form.factor_tensor_names(p))}
        results[p] = quantize_projection(form, p, weights[p], stored, module.ranks[p], quant, L=L, K=K, lam=lam,
                                         refit=refit)
    return quantized_module(module, results, quant)


def _check_form(form, name: str) -> None:
    if not form.quantizable:
        raise ConfigError(f"quantize_layer needs a layer of form {' or '.join(map(repr, quantizable_forms()))}, "
                          f"got {name!r}")


@torch.no_grad()
def quantize_projection(form, p: str, weights: torch.Tensor, stored: Mapping[str, torch.Tensor], rank: int,
                        quant: QuantConfig, *, L: torch.Tensor | None = None, K: torch.Tensor | None = None,
                        lam: torch.Tensor | None = None, refit: bool = True, chunk: int | None = None, device=None,
                        method: str = "exact", whitened_total: float | None = None,
                        ) -> tuple[dict[str, torch.Tensor], dict[str, dict], dict]:
    """Projection ``p`` of a fitted layer in quantized storage, ``chunk`` experts at a time
    wherever a whole ``(E, d_out, d_in)`` tensor would be built (refit, re-solve, errors).

    ``weights (E, d_out, d_in)`` the original experts (any dtype and device); ``stored`` the
    float fit's stored tensors of ``p`` (core, factors, index tensors, by stored name);
    ``L, K, λ`` the fit's whitening (:func:`moecore.maths.fit.whiten_in_place`) or ``None``;
    ``method`` the fit's SVD path (its working precision is the errors' too);
    ``whitened_total`` the fit's ``Σ_i ‖W_i L_i‖²`` if known (one product less per chunk).  Returns the
    dequantized stored tensors (float64; index tensors as they are), the codes of each
    quantized name and the report entries ``weight_rel_error``, ``output_rel_error`` (on the
    calibration inputs, ``None`` without ``L``) and ``quant_refit``."""
    device = torch.device(device) if device is not None else weights.device
    g, cb, fb, qm = quant.group_size, quant.core_bits, quant.factor_bits, quant.method
    core_name, names, index_names = form.core_name(p), form.param_names(p), form.index_param_names(p)
    core = stored[core_name].to(device=device, dtype=torch.float64)  # (d_out, d_in)
    factors = tuple(stored[n].to(device=device, dtype=torch.float64) for n in names)
    codes: dict[str, dict[str, torch.Tensor]] = {}
    refitted = cb is None
    if cb is not None:
        codes[core_name] = qc = quantize(core, cb, g, qm, "core")
        core = dequantize(qc, tuple(core.shape), cb, "core", torch.float64)  # (d_out, d_in)
        if refit:  # the factors absorb the core's rounding error
            new = form.refit_factors(weights, core, rank, L, K, chunk=chunk, device=device, method=method)
            if new is not None:
                factors, refitted = tuple(f.to(torch.float64) for f in new), True
    if fb is not None:
        def quantize_factor(i: int, t: torch.Tensor) -> torch.Tensor:
            codes[names[i]] = q = quantize(t, fb, g, qm, "factor")
            return dequantize(q, tuple(t.shape), fb, "factor", torch.float64)  # (E, d, s)

        def residual(sl: slice) -> torch.Tensor:  # W_i − Q(C) for experts sl  (n, d_out, d_in)
            return weights[sl].to(device=device, dtype=torch.float64) - core

        factors = form.quantize_factors(factors, quantize_factor, residual=residual if refit else None,
                                        resolve=refit, chunk=chunk)
    out = {core_name: core, **dict(zip(names, factors)), **{n: stored[n] for n in index_names}}
    werr, oerr = mf.errors(weights, _approx(form, p, out), L, lam, chunk=chunk, device=device,
                           compute_dtype=mf.compute_dtype(method),
                           whitened=(None, whitened_total) if whitened_total is not None else None)
    return out, codes, {"weight_rel_error": werr, "output_rel_error": oerr, "quant_refit": bool(refit and refitted)}


def _approx(form, p: str, stored: Mapping[str, torch.Tensor]):
    """``approx(experts) -> Ŵ[experts]`` of projection ``p`` from its ``stored`` tensors: a slice's
    factors alone where every factor has one entry per expert (:attr:`Form.per_expert_factors`),
    else the whole reconstruction once, sliced."""
    core = stored[form.core_name(p)]
    if form.per_expert_factors:
        rebuild = get_form(form.training_form or form.name)  # the form its training slices are in
        return lambda sl: rebuild.reconstruct(core, form.training_slice(stored.__getitem__, p, sl.start, sl.stop))
    whole = form.reconstruct(core, tuple(stored[n] for n in form.factor_tensor_names(p)))  # (E, d_out, d_in)
    return lambda sl: whole[sl]


def quantized_module(module: CompressedExperts, results: Mapping[str, tuple], quant: QuantConfig) -> CompressedExperts:
    """The layer ``module`` in quantized storage from :func:`quantize_projection`'s ``results[p]``
    for every projection: codes where quantized, the dequantized float values elsewhere; its
    report gains the quantized errors, the float fit's kept as ``float_*``."""
    _check_form(module.form_impl, module.form)
    ref = module.stored(module.form_impl.core_name("gate"))
    out = CompressedExperts(module.num_experts, module.hidden_size, module.intermediate_size, module.form,
                            module.ranks, module.layout, act_fn=module.act_fn, dtype=ref.dtype, device=ref.device,
                            quant=quant)
    report = {p: dict(v) for p, v in (module.report or {}).items()}
    for p, (tensors, codes, errs) in results.items():
        for name, t in tensors.items():
            if name in codes:
                out.set_quantized(name, codes[name])
            else:
                getattr(out, name).copy_(t)
        entry = report.setdefault(p, {"rank": module.ranks[p]})
        for key in ("weight_rel_error", "output_rel_error"):
            if key in entry:
                entry[f"float_{key}"] = entry[key]
        entry.update(errs)
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
