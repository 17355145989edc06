"""Block recovery: fit one compressed experts block to the ORIGINAL block's outputs by Adam.

The per-layer training step shared by the layer engine (:mod:`moecore.engine`, after a
layer's zero-shot fit, ``CompressionConfig.recover_steps``) and by ``moecore recover``
(:mod:`moecore.training.recover`).  It works on one experts module and the routed rows that
reached it on calibration text, never on the whole model:

- ``x (N, H)`` the experts' inputs, ``top_k_index (N, k)``, ``top_k_weights (N, k)`` the
  router's choice (the router is not compressed, so both blocks see the same routing);
- ``y (N, H)`` the original block's output on them, routing-weighted as the model computes
  it: ``y_t = Σ_j w_tj · E_{i_tj}(x_t)`` (:func:`block_targets`);
- the loss is the relative block-output error ``‖ŷ − y‖² / ‖y‖²`` on a random batch of rows
  per Adam step (:func:`train_block`), over the factors (and optionally the cores), each
  tensor with a step size relative to its own scale (:func:`step_sizes`).

Whole calibration sequences are held out (every ``HOLDOUT_EVERY``-th one,
:func:`heldout_rows`): the trained parameters are kept only if the held-out error fell, so a
layer is never made worse on tokens it was not trained on.  Training runs on a float32 copy
(float64 for a float64 module) on the rows' device; the result is judged in the module's own
dtype.
"""
from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from .errors import TrainingError, UnsupportedModelError
from .compressed_experts import CompressedExperts
from .expert_source import routed_outputs
from .families import ExpertsLayout, is_compressed
from .forms import PROJECTIONS
from .recovery_chunks import chunk_module, expert_chunk, part_output, rows_output, trained_form, write_chunk
from .heap import reusable_heap

#: every this many-th calibration sequence is held out to judge a trained block
HOLDOUT_EVERY = 5
#: fewer held-out rows than this: judge on the training rows instead
MIN_HELDOUT_ROWS = 16
#: rows per forward when measuring targets and errors (bounds the activation memory)
CHUNK = 4096
#: devices where recovery's Adam runs as torch's fused kernel (``torch.optim.Adam(fused=True)``)
FUSED_ADAM_DEVICES = ("cpu", "cuda")


def sequence_ids(rows_per_call: list[int], batch_shapes: list[tuple[int, int]]) -> torch.Tensor:
    """Calibration sequence of every row reaching an experts module, ``(N,)`` int64.

    Call ``b`` of the module saw batch ``b`` of shape ``(B, L)`` and gave ``rows_per_call[b]``
    rows: ``B·L`` (routed call: token order) or a multiple of it (``dense_prescaled``: one
    block of ``B·L`` rows per expert); anything else is split evenly over the batch's
    sequences in row order."""
    out, offset = [], 0
    for n, (b, length) in zip(rows_per_call, batch_shapes):
        t = b * length
        r = torch.arange(n)
        tok = r % t if t and n % t == 0 else r * t // max(n, 1)  # (n,) token within the batch
        out.append(offset + tok // length)
        offset += b
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def heldout_rows(seq: torch.Tensor, every: int = HOLDOUT_EVERY, min_rows: int = MIN_HELDOUT_ROWS) -> torch.Tensor:
    """``(N,)`` bool: rows of every ``every``-th sequence (``seq % every == every - 1``).  All
    False (judge on the training rows) when that leaves fewer than ``min_rows`` held-out rows or
    no training row."""
    held = seq % every == every - 1
    if int(held.sum()) < min_rows or bool(held.all()):
        held = torch.zeros_like(held)
    return held


def routed_forward(layout: ExpertsLayout, module: nn.Module, x: torch.Tensor, top_k_index: torch.Tensor,
                   top_k_weights: torch.Tensor) -> torch.Tensor:
    """Output of ``module`` (original or compressed) on routed pairs ``x (N, H)``,
    ``top_k_index (N, k)``, ``top_k_weights (N, k)`` -> ``(N, H)``, whatever ``layout.call`` is
    (layer-wise recovery compares the two modules on the same routed rows).  An original
    module called densely (Llama-4) is evaluated expert by expert from its weights."""
    if is_compressed(module):
        return module.routed(x, top_k_index, top_k_weights)
    if layout.call == "routed":
        return module(x, top_k_index, top_k_weights)
    if layout.has_bias:
        raise UnsupportedModelError(f"layout {layout.name!r}: a dense call with biases is not supported")
    act = layout.activation_fn(getattr(module, "act_fn", None))
    return routed_outputs(layout.split(module), layout, act, x, top_k_index, top_k_weights)


@torch.no_grad()
def block_targets(original: nn.Module, layout: ExpertsLayout, x: torch.Tensor, idx: torch.Tensor,
                  w: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """The original block's output ``y (N, H)`` on ``x (N, H)``, ``idx (N, k)``, ``w (N, k)``
    (:func:`routed_forward`), ``chunk`` rows at a time on the
    rows' device."""
    parts = [routed_forward(layout, original, x[i:i + chunk], idx[i:i + chunk], w[i:i + chunk])
             for i in range(0, x.shape[0], chunk)]
    return torch.cat(parts) if parts else torch.zeros_like(x)


@torch.no_grad()
def rel_error(module: nn.Module, layout: ExpertsLayout, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor,
              y: torch.Tensor, chunk: int = CHUNK) -> float:
    """Relative block-output error ``‖module(x) − y‖² / ‖y‖²`` (float64 sums), ``module`` run in
    its own dtype."""
    dt = next(module.parameters()).dtype
    err = 0.0
    for i in range(0, x.shape[0], chunk):
        out = routed_forward(layout, module, x[i:i + chunk].to(dt), idx[i:i + chunk], w[i:i + chunk])
        err += float((out.double() - y[i:i + chunk].double()).pow(2).sum())
    return err / max(float(y.double().pow(2).sum()), 1e-30)


def trainable(module: nn.Module, train_core: bool) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` that recovery trains: a compressed module's float factors (its form's
    :meth:`~moecore.forms.Form.param_names`) and, with ``train_core``, its cores; biases and
    quantized tensors (buffers) never.  A plain experts module trains all its weights."""
    if not is_compressed(module):
        return list(module.named_parameters())
    return module.trainable_parameters(train_core)


def _training_copy(module: nn.Module, dtype: torch.dtype) -> tuple[nn.Module, dict[str, str]]:
    """A copy of ``module`` to train in ``dtype`` and ``{its parameter name: the copy's}``: a
    compressed module's :meth:`~moecore.compressed_experts.CompressedExperts.training_copy`
    (in its form's training form), a plain one deep-copied."""
    if is_compressed(module):
        return module.training_copy(dtype)
    return copy.deepcopy(module).to(dtype), {n: n for n, _ in module.named_parameters()}


def _train_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def step_sizes(params: list[torch.Tensor], lr: float) -> list[float]:
    """Adam's peak step size per tensor: ``lr`` times the tensor's RMS at the start (a zero
    tensor gets the smallest non-zero RMS).  The factors of one projection differ in scale by
    orders of magnitude (whitened: ``A = U√S`` has RMS ~0.5, ``B = L⁻ᵀV√S`` ~0.02 on the bundled
    models), and Adam moves every entry by about its step size: one absolute rate either
    barely moves ``A`` or makes ``B`` diverge.  A relative rate moves each by the same fraction."""
    rms = [_rms(p) for p in params]
    floor = min((r for r in rms if r > 0), default=1.0)
    return [lr * (r if r > 0 else floor) for r in rms]


#: elements per block when :func:`_rms` sums a large tensor's squares
RMS_BLOCK = 1 << 24


def _rms(p: torch.Tensor) -> float:
    """Root mean square of ``p`` in float64, a block of :data:`RMS_BLOCK` elements at a time
    for a large tensor (a DeepSeek-V3 layer's ``ragged_b_gate`` is 2.9 GB: a whole float64
    copy and its square would take 11.5 GB)."""
    if not p.numel():
        return 0.0
    if p.numel() <= RMS_BLOCK:
        return float(p.detach().double().pow(2).mean().sqrt())
    flat = p.detach().reshape(-1)
    total = sum(float(flat[i:i + RMS_BLOCK].double().pow(2).sum()) for i in range(0, flat.numel(), RMS_BLOCK))
    return math.sqrt(total / flat.numel())


def block_loss(layout: ExpertsLayout, work: nn.Module, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor,
               y: torch.Tensor):
    """``batch_loss(rows)``: the relative MSE ``‖work(x) − y‖² / mean(y²)`` of the block's output
    on a batch of rows of ``x (n, H)``, ``idx (n, k)``, ``w (n, k)``, ``y (n, H)``."""
    scale = y.pow(2).mean().clamp_min(1e-30)
    return lambda sel: (routed_forward(layout, work, x[sel], idx[sel], w[sel]) - y[sel]).pow(2).mean() / scale


def _fit(work: nn.Module, names: list[str], sizes: list[float], batch_loss, n: int, device, *,
         steps: int, batch_tokens: int, generator: torch.Generator, where: str, fused: bool = True) -> None:
    """Adam on ``work``'s parameters ``names`` (the rest frozen), each with its peak step size
    ``sizes`` (:func:`step_sizes`, cosine-decayed to 0), on ``batch_loss(rows)`` of a random
    batch of ``batch_tokens`` of the ``n`` rows per step.  ``fused``: torch's fused Adam where
    it exists (:data:`FUSED_ADAM_DEVICES`), else its per-tensor loop."""
    flags = {n: p.requires_grad for n, p in work.named_parameters()}
    for name, p in work.named_parameters():
        p.requires_grad_(name in names)
    own = dict(work.named_parameters())
    params = [own[name] for name in names]
    # one fused kernel per tensor where torch has it: the default on a CPU is a loop of
    # elementwise ops with two full-size temporaries per tensor and step
    fused = fused and all(p.device.type in FUSED_ADAM_DEVICES and p.dtype in (torch.float32, torch.float64)
                          for p in params)
    opt = torch.optim.Adam([{"params": [p], "lr": a} for p, a in zip(params, sizes)], fused=fused or None)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    try:
        with torch.enable_grad():
            for _ in range(steps):
                sel = torch.randint(0, n, (min(batch_tokens, n),), generator=generator).to(device)  # (b,)
                loss = batch_loss(sel)
                if not bool(torch.isfinite(loss)):
                    raise TrainingError(f"non-finite relative MSE ({float(loss)}) while recovering {where}; stopping")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    finally:
        for name, p in work.named_parameters():
            p.requires_grad_(flags[name])
            p.grad = None


@reusable_heap()  # every Adam temporary from the heap, reused (a fresh scope per call)
def train_block(module: nn.Module, layout: ExpertsLayout, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor,
                y: torch.Tensor, held: torch.Tensor, *, steps: int, lr: float, batch_tokens: int,
                train_core: bool = False, seed: int = 0, where: str = "the experts",
                memory_gb: float | None = None) -> dict[str, Any]:
    """Fit ``module`` (in place) to the original block's outputs ``y``; keep the result only if
    the held-out error fell.

    Args:
        module: the compressed experts module (a plain one trains all its weights).
        layout: the family's :class:`~moecore.families.ExpertsLayout`.
        x, idx, w, y: routed rows ``(N, H), (N, k), (N, k)`` and targets ``(N, H)``
            (:func:`block_targets`), all on the device to train on.
        held: ``(N,)`` bool rows held out (:func:`heldout_rows`); all False: judged on the
            training rows.
        steps, lr, batch_tokens: Adam steps, peak RELATIVE learning rate (each tensor's step size
            is ``lr`` times its RMS, :func:`step_sizes`; cosine decay to 0), rows per step.
        train_core: also train the cores.
        seed: seed of the row sampling.
        where: the module's name in error messages.
        memory_gb: GiB that the trained tensors of a compressed module may take with their
            gradients, Adam's moments and each step's operands (24 bytes per element): when its
            factors need more, the experts are trained a chunk at a time
            (:func:`train_experts_in_chunks`, factors only); ``None``: all at once.
    Returns ``{"steps", "kept", "params", "rows", "heldout_rows", "rel_mse_before",
    "rel_mse_after", "val_rel_mse_before", "val_rel_mse_after"}`` (the "after" values are the
    kept parameters' errors), and, trained in chunks, ``"expert_chunks", "kept_chunks",
    "trained_core"`` (``"params"`` then counts the factors only).  ``TrainingError`` on a
    non-finite error.
    """
    rows = ((idx >= 0) & (idx < getattr(module, "num_experts", 1 << 62))).any(1)  # (N,) routed to some expert
    fit, val = rows & ~held, rows & held
    if not bool(val.any()):
        val = fit
    fx, fi, fw, fy = x[fit], idx[fit], w[fit], y[fit]
    vx, vi, vw, vy = x[val], idx[val], w[val], y[val]
    params = trainable(module, train_core)
    report = {"steps": steps, "kept": False, "params": sum(p.numel() for _, p in params),
              "rows": int(fx.shape[0]), "heldout_rows": int(vx.shape[0]) if bool(held.any()) else 0}
    chunk = expert_chunk(module, memory_gb)
    gen = torch.Generator().manual_seed(seed)
    if chunk is not None:  # the trained tensors do not fit memory_gb: experts a chunk at a time
        sizes = dict(zip((n for n, _ in params), step_sizes([p for _, p in params], lr)))
        report["params"] = sum(p.numel() for _, p in trainable(module, False))  # the cores stay
        return {**report, **train_experts_in_chunks(module, layout, chunk, (fx, fi, fw, fy), (vx, vi, vw, vy), sizes,
                                                    steps=steps, batch_tokens=batch_tokens, generator=gen, where=where)}
    before, val_before = rel_error(module, layout, fx, fi, fw, fy), rel_error(module, layout, vx, vi, vw, vy)
    if not (math.isfinite(before) and math.isfinite(val_before)):
        raise TrainingError(f"{where} gives a non-finite output error ({before}); stopping")
    report.update(rel_mse_before=before, rel_mse_after=before, val_rel_mse_before=val_before,
                  val_rel_mse_after=val_before)
    if not steps or not params or fx.shape[0] == 0:
        return report
    dt = _train_dtype(params[0][1].dtype)
    sizes = step_sizes([p for _, p in params], lr)
    work, to_work = _training_copy(module, dt)  # trained in float32 (float64 for a float64 module)
    _fit(work, [to_work[n] for n, _ in params], sizes, block_loss(layout, work, fx.to(dt), fi, fw.to(dt), fy.to(dt)),
         fx.shape[0], fx.device, steps=steps, batch_tokens=batch_tokens, generator=gen, where=where)
    start = [p.detach().clone() for _, p in params]
    if is_compressed(module):
        module.load_trained(work, to_work, [n for n, _ in params])
    else:
        with torch.no_grad():
            for n, p in params:
                p.copy_(work.get_parameter(n))
    del work
    after, val_after = rel_error(module, layout, fx, fi, fw, fy), rel_error(module, layout, vx, vi, vw, vy)
    if val_after < val_before:  # judged on held-out sequences, in the module's own dtype
        report.update(kept=True, rel_mse_after=after, val_rel_mse_after=val_after)
    else:  # never make a block worse on unseen tokens: restore the start
        with torch.no_grad():
            for (_, p), s0 in zip(params, start):
                p.copy_(s0)
    return report


def _rel(out: torch.Tensor, y: torch.Tensor) -> float:
    """``‖out − y‖² / ‖y‖²`` in float64 sums."""
    return float((out.double() - y.double()).pow(2).sum()) / max(float(y.double().pow(2).sum()), 1e-30)


@torch.no_grad()
def train_experts_in_chunks(module: CompressedExperts, layout: ExpertsLayout, chunk: int, fit: tuple, val: tuple,
                            sizes: dict[str, float], *, steps: int, batch_tokens: int, generator: torch.Generator,
                            where: str) -> dict[str, Any]:
    """Recovery of a compressed module too large to train, or even to run, at once: the factors
    of experts ``a:b`` (``chunk`` at a time, in index order), ``steps`` Adam steps each, the
    other experts and the cores frozen.

    The module is only ever run a chunk of experts at a time (:func:`~moecore.recovery_chunks.part_output`:
    a ragged module's whole forward pads every expert to the largest rank, 11 GB of operands at
    DeepSeek-V3's shape).  Its output on the fitted and held-out rows is the sum of its chunks'
    outputs, kept up to date: chunk ``a:b`` is fitted on the rows routed to at least one of its
    experts, to ``y`` minus the other experts' output there (its pairs summed back to their
    rows), and kept only if the held-out error of the whole output fell.  ``fit``, ``val``:
    ``(x (n, H), idx (n, k), w (n, k), y (n, H))``; ``sizes``: each stored factor's peak step
    size.  Returns the errors before and after, ``"expert_chunks", "kept_chunks", "kept"`` and
    ``"trained_core": False``."""
    form, trained_as = trained_form(module)
    e, mdt, dt = module.num_experts, module.float_dtype, _train_dtype(module.float_dtype)
    names = {p: trained_as.param_names(p) for p in PROJECTIONS}
    trained = [n for p in PROJECTIONS for n in names[p]]
    step = [sizes[n] for p in PROJECTIONS for n in form.param_names(p)]
    fx, fi, fw, fy = fit
    vx, vi, vw, vy = val
    parts = [(a, min(e, a + chunk)) for a in range(0, e, chunk)]
    cur, cur_val = torch.zeros_like(fx, dtype=torch.float32), torch.zeros_like(vx, dtype=torch.float32)  # (n, H)
    for a, b in parts:  # the layer's output as the sum of its chunks' (each chunk module built once)
        part = chunk_module(module, a, b, mdt)
        cur += part_output(part, a, b, fx, fi, fw)
        cur_val += part_output(part, a, b, vx, vi, vw)
        del part
    before, val_before = _rel(cur, fy), _rel(cur_val, vy)
    if not (math.isfinite(before) and math.isfinite(val_before)):
        raise TrainingError(f"{where} gives a non-finite output error ({before}); stopping")
    val_now, kept, chunks = val_before, 0, 0
    for a, b in parts:
        rows = ((fi >= a) & (fi < b)).any(1)  # (n,) rows with a pair in the chunk
        vrows = ((vi >= a) & (vi < b)).any(1)
        if not steps or not bool(rows.any()):
            continue
        chunks += 1
        part = chunk_module(module, a, b, mdt)
        old, old_val = part_output(part, a, b, fx[rows], fi[rows], fw[rows]), part_output(part, a, b, vx[vrows], vi[vrows], vw[vrows])
        del part
        target = (fy[rows] - (cur[rows] - old)).to(dt)  # y minus the other experts' output  (n_c, H)
        work = chunk_module(module, a, b, dt)
        ti, tx, tw, scale = fi[rows], fx[rows].to(dt), fw[rows].to(dt), fy[rows].to(dt).pow(2).mean().clamp_min(1e-30)

        def batch_loss(sel: torch.Tensor) -> torch.Tensor:
            return (rows_output(work, a, b, tx[sel], ti[sel], tw[sel], dt) - target[sel]).pow(2).mean() / scale

        saved = {p: [t.clone() for t in form.training_slice(module.stored, p, a, b)] for p in PROJECTIONS}
        _fit(work, trained, step, batch_loss, int(tx.shape[0]), tx.device, steps=steps, batch_tokens=batch_tokens,
             generator=generator, where=f"{where} (experts {a}:{b})")
        write_chunk(module, a, b, {p: [work.get_parameter(n) for n in names[p]] for p in PROJECTIONS})
        del work, batch_loss, target
        new = chunk_module(module, a, b, mdt)  # judged in the module's own dtype
        new_val = part_output(new, a, b, vx[vrows], vi[vrows], vw[vrows])
        cand = cur_val.clone()
        cand[vrows] += new_val - old_val
        if _rel(cand, vy) < val_now:
            cur[rows] += part_output(new, a, b, fx[rows], fi[rows], fw[rows]) - old
            cur_val, val_now, kept = cand, _rel(cand, vy), kept + 1
        else:  # never make the block worse on unseen tokens: this chunk's start back
            write_chunk(module, a, b, saved)
        del new, saved, old, old_val
    after = _rel(cur, fy)
    return {"rel_mse_before": before, "rel_mse_after": after if kept else before, "val_rel_mse_before": val_before,
            "val_rel_mse_after": val_now, "kept": kept > 0, "expert_chunks": chunks, "kept_chunks": kept,
            "trained_core": False}
