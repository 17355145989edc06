"""``compress(model, config, calibration=, tokenizer=)``: calibration capture + model surgery.

Steps: find the experts modules (:func:`moecore.families.find_experts`); optionally run the
ORIGINAL model on calibration text (sequences spread over the whole text) with hooks that
accumulate, per expert, the Gram matrix of its routed inputs (gate/up: hidden states;
down: ``act(gate)·up`` with the original weights), each token weighted by its squared
routing weight by default, and its router hit count; solve ranks; then, one layer at a
time, compute the core start and the factors, refine them jointly (in float64), measure
the errors and swap the experts module for a
:class:`~moecore.compressed_experts.CompressedExperts` of the same dtype/device.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .compressed_experts import PROJECTIONS, CompressedExperts
from .config import CompressionConfig
from .data import calibration_sequences
from .errors import ConfigError
from .families import ExpertsLayout, find_experts
from .hf_integration import mark_compressed
from .maths import budget
from .maths import decompose as dm

_F64 = torch.float64


# ---------------------------------------------------------------------------- calibration
def _calibration_ids(texts: Sequence[str], tokenizer: Any, cfg: CompressionConfig) -> list[torch.Tensor]:
    """Calibration sequences ``[(calib_seq_len,), ...]`` holding at most ``calib_max_tokens``,
    drawn evenly over the whole text (:func:`moecore.data.calibration_sequences`: small text is
    tokenized whole into the EOS-joined stream the evaluator scores; a large file or
    :class:`~moecore.data.TextFile` is sampled in windows, so memory stays bounded).
    """
    if tokenizer is None:
        raise ConfigError("calibration text needs a tokenizer (compress(..., tokenizer=tok))")
    return calibration_sequences(texts, tokenizer, cfg.calib_max_tokens, cfg.calib_seq_len)


class _GramHook:
    """Forward pre-hook on one experts module accumulating per-expert Grams and counts."""

    def __init__(self, module: nn.Module, layout: ExpertsLayout, weighting: str = "tokens"):
        views = layout.split(module)
        self.module, self.layout, self.weighting = module, layout, weighting
        e, f, h = views["gate"].shape
        self.gram_in = torch.zeros(e, h, h, dtype=_F64)  # (E, H, H)
        self.gram_mid = torch.zeros(e, f, f, dtype=_F64)  # (E, F, F)
        self.counts = torch.zeros(e, dtype=_F64)  # (E,)
        self.act = layout.activation_fn(getattr(module, "act_fn", None))

    @torch.no_grad()
    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        names = ("hidden_states", "top_k_index", "top_k_weights")
        vals = list(args) + [kwargs.get(n) for n in names[len(args):]]
        x, idx, wts = vals[0], vals[1], vals[2]
        views = self.layout.split(module)
        x = x.reshape(-1, x.shape[-1])
        for e in torch.unique(idx).tolist():
            if e < 0 or e >= self.counts.numel():
                continue  # sentinel "no expert"
            hit = idx == e  # (T, k)
            rows = hit.any(dim=-1)
            xe = x[rows]  # (n_e, H)
            # routing weighting: the expert's output is scaled by its routing weight w_t, so
            # its output error is Σ_t w_t² ‖Δ x_t‖²; scaling the rows by w_t weights the Grams by w_t²
            rw = (wts.reshape(hit.shape) * hit).sum(-1)[rows].to(_F64).cpu()[:, None] \
                if self.weighting == "routing" and wts is not None else None  # (n_e, 1)
            gate = xe @ views["gate"][e].mT  # (n_e, F)
            up = xe @ views["up"][e].mT
            if self.layout.has_bias:
                bg, bu = self.layout.split_bias(views["bias_gate_up"][e])
                gate, up = gate + bg, up + bu
            he = self.act(gate, up).to(_F64).cpu()  # (n_e, F)
            xe = xe.to(_F64).cpu()
            if rw is not None:
                he, xe = he * rw, xe * rw
            self.gram_in[e] += xe.mT @ xe
            self.gram_mid[e] += he.mT @ he
            self.counts[e] += xe.shape[0]


@torch.no_grad()
def collect_calibration(
    model: nn.Module, experts: list[tuple[str, ExpertsLayout]], texts: Sequence[str], tokenizer: Any,
    cfg: CompressionConfig, batch_size: int = 8,
) -> dict[str, dict[str, torch.Tensor]]:
    """Run the (original) model on calibration text; per experts path return
    ``{"gram_in": (E,H,H), "gram_mid": (E,F,F), "counts": (E,)}`` (float64, CPU)."""
    seqs = _calibration_ids(texts, tokenizer, cfg)
    hooks = {path: _GramHook(model.get_submodule(path), layout, cfg.calib_weighting) for path, layout in experts}
    handles = [model.get_submodule(p).register_forward_pre_hook(h, with_kwargs=True) for p, h in hooks.items()]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        full = [s for s in seqs if s.numel() == cfg.calib_seq_len]
        rest = [s for s in seqs if s.numel() != cfg.calib_seq_len]
        for i in range(0, len(full), batch_size):
            model(input_ids=torch.stack(full[i: i + batch_size]).to(device), use_cache=False)
        for s in rest:
            model(input_ids=s[None].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {p: {"gram_in": h.gram_in, "gram_mid": h.gram_mid, "counts": h.counts} for p, h in hooks.items()}


# ---------------------------------------------------------------------------- per layer maths
def _weights(module: nn.Module, layout: ExpertsLayout) -> dict[str, torch.Tensor]:
    views = layout.split(module)
    return {p: views[p].detach().to(_F64) for p in PROJECTIONS}  # (E, d_out, d_in)


def _grams(calib: dict[str, torch.Tensor] | None, p: str) -> torch.Tensor | None:
    if calib is None:
        return None
    return calib["gram_mid"] if p == "down" else calib["gram_in"]


def _core(w: torch.Tensor, cfg: CompressionConfig, calib: dict | None, p: str) -> torch.Tensor:
    """The core's closed-form start (``cfg.core``; ``auto`` = frequency with calibration)."""
    kind = ("frequency" if calib else "mean") if cfg.core == "auto" else cfg.core
    if kind == "output":
        return dm.output_core(w, _grams(calib, p), cfg.whiten_damping)  # (d_out, d_in)
    return dm.expert_core(w, calib["counts"] if kind == "frequency" else None)  # (d_out, d_in)


def _greedy_gains(model: nn.Module, experts, cfg, calib, whiten: bool) -> dict:
    """Marginal relative error energy per rank unit of every projection (pre-pass)."""
    gains = {}
    for path, layout in experts:
        module = model.get_submodule(path)
        c = calib.get(path) if calib else None
        if c is not None:
            c = {k: v.to(layout.split(module)["gate"].device) for k, v in c.items()}
        for p, w in _weights(module, layout).items():
            g = _grams(c, p) if whiten else None
            sv = dm.residual_spectrum(w, _core(w, cfg, c, p), g, cfg.whiten_damping)  # (E, k)
            total = ((w @ dm.whitening_factor(g, cfg.whiten_damping)) if g is not None else w).pow(2).sum()
            unit = sv.pow(2).sum(0) / total.clamp_min(1e-300)  # (k,)
            if cfg.form == "wrapper":
                unit = torch.nn.functional.pad(unit, (0, unit.numel() % 2)).view(-1, 2).sum(-1)
            gains[(path, p)] = unit.tolist()
    return gains


def solve_ranks(model: nn.Module, experts, cfg: CompressionConfig, calib=None, whiten: bool = False) -> dict:
    """Ranks ``{(path, proj): rank}`` from ``cfg.rank`` or ``cfg.target_ratio`` (+ ``allocation``).
    Raises ``ConfigError`` naming the projection for a rank above ``min(d_in, d_out)``."""
    shapes = []
    for path, layout in experts:
        for p, w in layout.split(model.get_submodule(path)).items():
            if p in PROJECTIONS:
                shapes.append(budget.ProjectionShape((path, p), w.shape[0], w.shape[1], w.shape[2]))
    if cfg.rank is not None:
        for s in shapes:
            budget.check_rank(s, cfg.rank)
        return {s.key: cfg.rank for s in shapes}
    if cfg.allocation == "greedy":
        return budget.solve_greedy(cfg.form, shapes, cfg.target_ratio, _greedy_gains(model, experts, cfg, calib, whiten))
    return budget.solve_uniform(cfg.form, shapes, cfg.target_ratio)


def compress_layer(
    module: nn.Module, layout: ExpertsLayout, cfg: CompressionConfig, ranks: dict[str, int],
    calib: dict[str, torch.Tensor] | None = None, whiten: bool = False, seed: int = 0,
) -> CompressedExperts:
    """Compress one experts module into a :class:`CompressedExperts` (same dtype/device),
    with ``report[p] = {"rank", "weight_rel_error", "output_rel_error", "whitened", ...}``."""
    views = layout.split(module)
    ref = views["gate"]
    if calib is not None:  # Grams are accumulated on CPU; do the maths where the weights live
        calib = {k: v.to(ref.device) for k, v in calib.items()}
    gen = torch.Generator(device=ref.device).manual_seed(seed)
    cores, factors, report = {}, {}, {}
    originals, whitening = _weights(module, layout), {}
    for p, w in originals.items():
        r, g = ranks[p], _grams(calib, p)
        wg = whitening[p] = g if whiten else None
        core = _core(w, cfg, calib, p)
        entry: dict[str, Any] = {"rank": r, "whitened": wg is not None}
        if cfg.form == "delta":
            core, fac, hist = dm.refine_delta(w, core, r, wg, cfg.whiten_damping, cfg.refine_steps, method=cfg.svd,
                                              generator=gen)
            approx = dm.reconstruct_delta(core, *fac)
            entry.update(refine_iters=len(hist) - 1, refine_objective_start=hist[0], refine_objective_end=min(hist))
        else:
            fac, hist = dm.wrapper_factors(w, core, r, wg, cfg.whiten_damping, steps=cfg.refine_steps)
            approx = dm.reconstruct_wrapper(core, *fac)
            entry.update(refine_iters=len(hist), refine_objective_start=hist[0], refine_objective_end=min(hist))
        entry["weight_rel_error"] = dm.relative_weight_error(w, approx)
        entry["output_rel_error"] = dm.relative_output_error(w, approx, g) if g is not None else None
        cores[p], factors[p], report[p] = core, fac, entry
    biases = {k: views[k].detach() for k in ("bias_gate_up", "bias_down") if k in views}
    new = CompressedExperts.from_factors(
        layout, cfg.form, cores, factors, biases, act_fn=getattr(module, "act_fn", None),
        dtype=ref.dtype, device=ref.device,
    )
    new.report = report
    if cfg.quant is not None:  # quantized core, factors refit to the core's rounding error, then quantized
        from .quant import quantize_layer

        new = quantize_layer(new, originals, whitening, cfg.quant, cfg.whiten_damping)
    new.train(module.training)
    return new


# ---------------------------------------------------------------------------- public verb
def compress(
    model: nn.Module, config: CompressionConfig, calibration: Sequence[str] | None = None, tokenizer: Any = None,
) -> nn.Module:
    """Compress every MoE layer's experts of ``model`` in place and return ``model``.

    Args:
        model: a transformers MoE model (fused 3-D experts; see :mod:`moecore.families`).
        config: a :class:`~moecore.config.CompressionConfig`.
        calibration: optional list of texts.  Enables activation-whitened init
            (``init="auto"|"whitened"``), the frequency-weighted core and output-space errors.
        tokenizer: required with ``calibration``.

    The router, shared experts, attention, router-logit recording and aux loss are left
    untouched; ``model.moecore_config`` is set to ``config``.  Raises ``ConfigError`` for a
    bad budget (naming the projection) and ``UnsupportedModelError`` for a non-MoE model or
    an experts layout moecore can't handle.
    """
    if not isinstance(config, CompressionConfig):
        raise ConfigError(f"config must be a CompressionConfig, got {type(config).__name__}")
    experts = [(path, layout) for path, _, layout in find_experts(model)]
    if calibration is not None and len(calibration) == 0:
        raise ConfigError("calibration is an empty list; pass texts or calibration=None")
    have_calib = calibration is not None
    if config.init == "whitened" and not have_calib:
        raise ConfigError("init='whitened' needs calibration text")
    if config.core in ("frequency", "output") and not have_calib:
        raise ConfigError(f"core={config.core!r} needs calibration text (router statistics)")
    whiten = have_calib and config.init in ("auto", "whitened")
    if config.rank is not None:  # fail fast on shapes before any calibration run
        solve_ranks(model, experts, config)
    calib = collect_calibration(model, experts, calibration, tokenizer, config) if have_calib else {}
    ranks = solve_ranks(model, experts, config, calib, whiten)
    with torch.no_grad():
        for i, (path, layout) in enumerate(tqdm(experts, desc="moecore: compressing", unit="layer", disable=None)):
            module = model.get_submodule(path)
            new = compress_layer(
                module, layout, config, {p: ranks[(path, p)] for p in PROJECTIONS}, calib.get(path), whiten,
                seed=config.seed + i,
            )
            model.set_submodule(path, new)
            del module
            calib.pop(path, None)
    model.moecore_config = config
    mark_compressed(model)  # a plain model.save_pretrained(dir) now round-trips like save_compressed
    return model
