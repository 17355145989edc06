"""Fitting one experts module: ranks from the budget, then core + factors per projection.

This is the "fit" step of the layer engine (:mod:`moecore.engine`); it works on one
experts module and its calibration inputs (:class:`~moecore.calibration.RoutedInputs`), never on
the whole model.  The maths is in :mod:`moecore.maths.fit` (expert-chunked, float64 on the
compute device); here live the memory policy (where Grams are stored, how many experts
per chunk), the order of the steps and the per-projection report.

Order for one module: Gram of the experts' inputs ``x`` → whitening factors (in place of the
Grams) → gate and up fitted → that storage freed → Gram of ``act(gate)·up`` (original
weights) → down fitted.  Peak memory is one Gram stack, not two.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .calibration import RoutedInputs
from .compressed_experts import CompressedExperts
from .config import CompressionConfig
from .errors import ConfigError
from .families import ExpertsLayout
from .forms import PROJECTIONS, get_form
from .gram_store import TriangularStack
from .heap import available_host_bytes
from .maths import budget
from .maths import fit as mf
from .quant import quantize_projection, quantized_module

_F64 = torch.float64
GIB = 1 << 30
#: below this many float64 bytes per Gram stack, Grams are stored in float64 (``gram_dtype="auto"``)
F64_GRAM_LIMIT = 1 * GIB
#: Gram stacks up to this size stay on an accelerator; larger ones live in host memory
DEVICE_GRAM_LIMIT = 4 * GIB


def gram_storage(num_experts: int, d: int, cfg: CompressionConfig, device: torch.device) -> tuple[torch.dtype, str]:
    """``(dtype, device)`` where one projection's ``(E, d, d)`` Gram stack is kept."""
    f64_bytes = num_experts * d * d * 8
    if cfg.gram_dtype == "auto":
        dtype = _F64 if f64_bytes <= F64_GRAM_LIMIT else torch.float32
    else:
        dtype = getattr(torch, cfg.gram_dtype)
    nbytes = num_experts * d * d * torch.empty(0, dtype=dtype).element_size()
    where = device if device.type == "cpu" or nbytes <= DEVICE_GRAM_LIMIT else torch.device("cpu")
    return dtype, str(where)


def host_stack_limit(cfg: CompressionConfig, reserve: int = 0, held: int = 0, available: int | None = None) -> float:
    """Bytes above which a Gram stack in host memory goes to a scratch file: ``cfg.gram_host_gb``,
    or half of what is ``available`` (default: now) less ``held`` (what ``plan`` expects to be
    allocated by then) and the ``reserve`` bytes the fit will still allocate."""
    if cfg.gram_host_gb is not None:
        return cfg.gram_host_gb * GIB
    available = available if available is not None else available_host_bytes()
    return max(0, (available or 1 << 62) - held - reserve) / 2


def gram_stack(num_experts: int, d: int, cfg: CompressionConfig, device: torch.device,
               scratch=None, reserve: int = 0) -> torch.Tensor | TriangularStack:
    """An empty ``(E, d, d)`` Gram stack where :func:`gram_storage` puts it; one in host memory
    larger than ``cfg.gram_host_gb`` (default: half the host memory available now, less the
    ``reserve`` bytes the fit will still allocate there) is a
    :class:`~moecore.gram_store.TriangularStack` (its lower triangle in a scratch file) in
    ``scratch`` (default: the system's temporary folder)."""
    dtype, where = gram_storage(num_experts, d, cfg, device)
    nbytes = num_experts * d * d * torch.empty(0, dtype=dtype).element_size()
    if torch.device(where).type == "cpu" and nbytes > host_stack_limit(cfg, reserve):
        return TriangularStack(num_experts, d, dtype, scratch)
    return torch.empty(num_experts, d, d, dtype=dtype, device=where)


def expert_chunk(num_experts: int, d_out: int, d_in: int, cfg: CompressionConfig) -> int:
    """Experts per chunk so that one chunk's float64 working set (weights, residual, whitened
    residual, whitening factor, its product) stays within ``cfg.fit_memory_gb``."""
    if cfg.expert_chunk:
        return cfg.expert_chunk
    return max(1, min(num_experts, int(cfg.fit_memory_gb * GIB) // (8 * _working_elements(d_out, d_in))))


def _working_elements(d_out: int, d_in: int) -> int:
    """One expert's working set in the fit, in elements: weights, residual, whitened residual
    ``(d_out, d_in)`` each, whitening factor and its product ``(d_in, d_in)`` each."""
    return 3 * d_out * d_in + 2 * d_in * d_in


#: oversampling of the randomized range finder (``decompose.truncated_svd``'s default)
OVERSAMPLE = 8


def svd_method(cfg: CompressionConfig, d_out: int, d_in: int, width: int | None = None) -> str:
    """``cfg.svd``, with ``"auto"``: ``"exact"`` (float64) up to 512 on the short side; above
    (every real-scale MoE layer: an exact float64 SVD of a Qwen3-30B-A3B layer's 128 experts
    alone takes about 24 s on one H200), ``"gram"`` (exact, float32) when the SVD's ``width``
    plus oversampling is at least a quarter of the short side, where one Gram and its ``eigh``
    cost less than the range finder's products and QRs (benchmarks/RESULTS.md §7f), else
    ``"randomized"``. Without ``width``: randomized above 512."""
    if cfg.svd != "auto":
        return cfg.svd
    short = min(d_out, d_in)
    if short <= 512:
        return "exact"
    return "gram" if width is not None and 4 * (width + OVERSAMPLE) >= short else "randomized"


def projection_shapes(path: str, module: nn.Module, layout: ExpertsLayout) -> list[budget.ProjectionShape]:
    """The three :class:`~moecore.maths.budget.ProjectionShape` of an experts module (meta is fine)."""
    views = layout.split(module)
    return [budget.ProjectionShape((path, p), *views[p].shape) for p in PROJECTIONS]


def solve_ranks(shapes: list[budget.ProjectionShape], cfg: CompressionConfig, gains: dict | None = None) -> dict:
    """Ranks ``{(path, proj): rank}`` from ``cfg.rank`` or ``cfg.target_ratio`` (+ ``allocation``;
    greedy needs ``gains`` from :func:`rank_gains`).  ``ConfigError`` names the projection
    for a rank above ``min(d_in, d_out)``, and refuses a float ``rank`` that stores no fewer
    parameters than the original unless ``cfg.allow_larger``."""
    if cfg.rank is not None:
        for s in shapes:
            budget.check_rank(s, cfg.rank)
        if not cfg.allow_larger and cfg.quant is None:  # quantized codes: compare bytes instead (stats)
            budget.check_smaller(get_form(cfg.form), shapes, cfg.rank)
        return {s.key: cfg.rank for s in shapes}
    if cfg.allocation == "greedy":
        if gains is None:
            raise ConfigError("allocation='greedy' needs the residual spectra of every layer (a first pass)")
        return budget.solve_greedy(get_form(cfg.form), shapes, cfg.target_ratio, gains)
    return budget.solve_uniform(get_form(cfg.form), shapes, cfg.target_ratio)


class _Projection:
    """One projection being fitted: weights view, Grams turned whitening factors, core start."""

    def __init__(self, w: torch.Tensor, cfg: CompressionConfig, inputs: RoutedInputs | None, L, K, lam, device):
        self.w, self.cfg, self.inputs, self.L, self.K, self.lam, self.device = w, cfg, inputs, L, K, lam, device
        e, d_out, d_in = w.shape
        self.chunk = expert_chunk(e, d_out, d_in, cfg)
        self.method = svd_method(cfg, d_out, d_in)

    def core_start(self, grams_raw: torch.Tensor | None) -> torch.Tensor:
        kind = ("frequency" if self.inputs is not None else "mean") if self.cfg.core == "auto" else self.cfg.core
        w = self.w
        if kind == "output":
            return mf.output_core(w, grams_raw, self.cfg.whiten_damping, chunk=self.chunk, device=self.device)
        counts = self.inputs.counts if kind == "frequency" else None
        return mf.expert_core(w, counts, chunk=self.chunk, device=self.device)


def _whitening(inputs: RoutedInputs, kind: str, module_views: dict, layout: ExpertsLayout, act, cfg, device,
               scratch=None, reserve: int = 0):
    """Gram stack of ``kind`` ("in" / "mid") turned into whitening factors in place.
    Returns ``(raw Grams copy or None, L, K, λ)`` (``K Kᵀ = S = Σ Ĝ_i``); the raw copy only when ``core="output"`` needs it
    (quantized storage works from ``L`` and ``λ``, :func:`moecore.quant.quantize_projection`)."""
    e = inputs.num_experts
    d = module_views["gate"].shape[2] if kind == "in" else module_views["gate"].shape[1]
    store = gram_stack(e, d, cfg, device, scratch, reserve)
    inputs.grams(kind, store, device, module_views, layout, act, cfg.calib_prior_tokens)
    raw = store.clone() if cfg.core == "output" else None
    K, lam = mf.whiten_in_place(store, cfg.whiten_damping, expert_chunk(e, d, d, cfg), device)
    if isinstance(store, TriangularStack):
        store.symmetric = False  # every expert now holds its (lower-triangular) factor
    return raw, store, K, lam


def _projections(views: dict, layout: ExpertsLayout, act, cfg: CompressionConfig, inputs: RoutedInputs | None,
                 device, scratch=None, reserve: int = 0):
    """Yield ``(p, _Projection, raw Grams or None, λ)`` for gate, up, down.  gate and up share
    one Gram stack of the experts' input (whitened once); it is freed before the down
    projection's stack is built.  ``reserve``: host bytes the fit will still allocate beside a
    stack (:func:`fit_reserve`)."""
    whiten = inputs is not None and cfg.init in ("auto", "whitened")
    white = None
    for p in PROJECTIONS:
        kind = "mid" if p == "down" else "in"
        if inputs is not None and (white is None or white[0] != kind):
            white = raw = L = None  # free the other Gram stack first (the caller drops its references too)
            white = (kind, *_whitening(inputs, kind, views, layout, act, cfg, device, scratch, reserve))
        raw, L, K, lam = white[1:] if white is not None else (None, None, None, None)
        w = views[p].detach() if get_form(cfg.form).chunked_weights else views[p][:]  # [:]: a whole tensor
        yield p, _Projection(w, cfg, inputs, L if whiten else None, K, lam, device), raw, L, lam


@torch.no_grad()
def fit_experts(
    module: nn.Module, layout: ExpertsLayout, cfg: CompressionConfig, ranks: dict[str, int],
    inputs: RoutedInputs | None, device=None, seed: int = 0, dtype: torch.dtype | None = None, scratch=None,
    store_dtype: torch.dtype | None = None,
) -> CompressedExperts:
    """Compress one experts module into a :class:`CompressedExperts` (on the module's device, in
    ``dtype``, default the module's; with ``store_dtype``, in that dtype, cast from ``dtype``:
    the same values as casting the module afterwards, without holding it at ``dtype``), with
    ``report[p] = {"rank", "whitened", "weight_rel_error", "output_rel_error", "refine_*", "svd"}``
    and, with calibration, ``"routed_tokens", "min_expert_tokens", "under_calibrated_experts"}``.
    ``scratch``: the folder of a Gram stack too large for host memory (:func:`gram_stack`)."""
    views = layout.split(module)
    ref = views["gate"]
    device = torch.device(device) if device is not None else ref.device
    whiten = inputs is not None and cfg.init in ("auto", "whitened")
    act = layout.activation_fn(getattr(module, "act_fn", None))
    form = get_form(cfg.form)
    out_dtype = dtype or ref.dtype
    final = store_dtype or out_dtype  # what each finished projection is kept in
    gen = torch.Generator(device=device).manual_seed(seed)
    cores, stored, ranks_out, report, quantized = {}, {}, {}, {}, {}
    reserve = fit_reserve(views, ranks, cfg, device)
    for p, proj, raw, L, lam in _projections(views, layout, act, cfg, inputs, device, scratch, reserve):
        r = ranks[p]
        proj.method = svd_method(cfg, *proj.w.shape[1:], form.svd_width(r, cfg.expert_rank_cap))
        entry: dict[str, Any] = {"rank": r, "whitened": whiten}
        # factor stacks over 1 GiB in float64 may be kept in float32 between refinement steps
        res = form.fit(proj.w, proj.core_start(raw), r, proj.L, proj.K, steps=cfg.refine_steps, method=proj.method,
                       generator=gen, chunk=proj.chunk, device=device, f64_factor_limit=F64_GRAM_LIMIT,
                       expert_rank_cap=cfg.expert_rank_cap)
        core, fac, hist = res.core, res.factors, res.history

        cdt = mf.compute_dtype(proj.method)  # the report's products in the fit's working precision

        def approx(sl, core=core.to(cdt), fac=fac):
            return form.reconstruct(core, tuple(f[sl].to(cdt) if f.is_floating_point() else f[sl] for f in fac))
        entry.update(refine_iters=res.refine_iters)
        entry.update(refine_objective_start=hist[0], refine_objective_end=min(hist), svd=proj.method)
        werr, oerr = mf.errors(proj.w, approx, L if inputs is not None else None, lam, chunk=proj.chunk, device=device,
                               compute_dtype=cdt, whitened=res.whitened)
        entry.update(weight_rel_error=werr, output_rel_error=oerr)
        if inputs is not None:
            entry.update(calibration_report(inputs, cfg))
        # the stored tensors in the stored precision now (as from_factors would cast and store them):
        # the padded float32 factor stacks of the ragged form are twice its stored tensors
        if final != out_dtype:  # through out_dtype first (no copy where the fit computed in it)
            fac = tuple(f.to(out_dtype) if f.is_floating_point() else f for f in fac)
        rank, tensors = form.to_stored(proj.w.shape[0], fac, dtype=final)
        whitened_total = res.whitened[1] if res.whitened and whiten else None
        del fac, res, approx
        cores[p], stored[p], ranks_out[p], report[p] = core.to(out_dtype).to(final), tensors, rank, entry
        if cfg.quant is not None:  # quantized core, factors refit to its rounding error, then quantized: now,
            # while this projection's whitening factors exist (the gate/up ones are freed before down's)
            names = (form.core_name(p), *form.factor_tensor_names(p))
            quantized[p] = quantize_projection(form, p, proj.w, dict(zip(names, (cores[p], *tensors))), rank,
                                               cfg.quant, L=proj.L, K=proj.K, lam=lam if whiten else None,
                                               chunk=proj.chunk, device=device, method=proj.method,
                                               whitened_total=whitened_total)
        del core, tensors, proj, raw, L, lam  # the generator frees this Gram stack before building the next
    biases = {k: views[k][:] for k in ("bias_gate_up", "bias_down") if k in views}
    new = CompressedExperts.from_stored(layout, cfg.form, ref.shape[0], ranks_out, cores, stored, biases,
                                        act_fn=getattr(module, "act_fn", None), dtype=final, device=ref.device)
    new.report = report
    if quantized:
        new = quantized_module(new, quantized, cfg.quant)
    new.train(module.training)
    return new


def fit_reserve(views: dict, ranks: dict[str, int], cfg: CompressionConfig, device: torch.device) -> int:
    """Host bytes a fit on the CPU allocates beside a Gram stack: the largest projection's factor
    stacks in the fit's layout (the ragged form pads every expert to its cap) and precision,
    plus its chunk's working set (float32 where the SVD path computes in float32).  A stack is
    kept in memory only if it fits beside them (at DeepSeek-V3's shape the down projection's
    4.3 GB stack did not: 7.4 GB of factor stacks followed it, and the run was killed).  0 on
    an accelerator, whose fit does not use host memory."""
    if device.type != "cpu":
        return 0
    form, need = get_form(cfg.form), 0
    for p in PROJECTIONS:
        e, d_out, d_in = views[p].shape
        width = form.svd_width(ranks[p], cfg.expert_rank_cap)
        method = svd_method(cfg, d_out, d_in, width)
        elems = e * (d_out + d_in) * width
        stacks = elems * mf.factor_dtype(method, elems * 8, F64_GRAM_LIMIT).itemsize
        # the chunk is sized for float64 (expert_chunk); its working set in the fit's precision
        work = expert_chunk(e, d_out, d_in, cfg) * _working_elements(d_out, d_in) * mf.compute_dtype(method).itemsize
        need = max(need, stacks + work)
    return need


def calibration_report(inputs: RoutedInputs, cfg: CompressionConfig) -> dict[str, Any]:
    """Routed calibration tokens of one layer and how many experts got fewer than
    ``calib_prior_tokens`` of them (those are mostly fitted to the layer-wide Gram)."""
    counts = inputs.counts
    return {"routed_tokens": int(counts.sum()), "min_expert_tokens": int(counts.min()),
            "under_calibrated_experts": int((counts < cfg.calib_prior_tokens).sum())}


@torch.no_grad()
def rank_gains(path: str, module: nn.Module, layout: ExpertsLayout, cfg: CompressionConfig,
               inputs: RoutedInputs | None, device=None, scratch=None) -> dict:
    """Greedy allocation's marginal gains of one experts module: for every projection, the
    (whitened) residual energy each rank unit removes, relative to the projection's energy."""
    views = layout.split(module)
    device = torch.device(device) if device is not None else views["gate"].device
    act = layout.activation_fn(getattr(module, "act_fn", None))
    form = get_form(cfg.form)
    gains = {}
    for p, proj, raw, _, _ in _projections(views, layout, act, cfg, inputs, device, scratch):
        sv, total = mf.spectrum(proj.w, proj.core_start(raw), proj.L, chunk=proj.chunk, device=device)
        unit = sv.pow(2).sum(0) / max(total, 1e-300)  # (k,) per delta-style rank unit
        gains[(path, p)] = form.rank_unit_gains(unit).tolist()
    return gains
