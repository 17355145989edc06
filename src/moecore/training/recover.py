"""Layer-wise local recovery: fit each compressed experts block to the original block.

For each MoE layer in order: run the (compressed) student on calibration text up to that
layer and cache what enters its experts module (hidden states, top-k indices and weights:
the router is shared, so the original block sees the same routing); compute the original
experts' output on those inputs; then fit the compressed block's trainable factors by Adam
on the relative MSE. Inputs come from the student itself, so later layers are fitted to
the activations they will actually see (errors of earlier layers included).

Memory: the student plus ONE original experts layer, read from the teacher's safetensors
(:class:`OriginalExpertsLoader`), plus the cached activations of one layer.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from ..progress import progress_bar

from ..calibration import ExpertsInputHook
from ..config import RecoveryConfig
from ..data import calibration_sequences, load_split
from ..errors import ConfigError, DataError, TrainingError
from ..families import find_experts, is_compressed
from ..modeling import load_tokenizer
from .common import CORE_MARKER, FACTOR_MARKERS
from .guards import check_finite, check_teacher
from .originals import OriginalExpertsLoader


class _Stop(Exception):
    pass


@dataclass
class RecoveryReport:
    """Per-layer relative output MSE (‖y − ŷ‖² / ‖y‖²) before and after fitting."""
    tokens: int
    steps: int
    layers: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def _calibration_ids(tokenizer, texts, max_tokens: int, seq_len: int) -> torch.Tensor:
    """``(N, seq_len)`` full calibration sequences, at most ``max_tokens`` in all, spread evenly
    over the whole text (:func:`moecore.data.calibration_sequences`; a ``TextFile`` is streamed)."""
    seqs = [s for s in calibration_sequences(texts, tokenizer, max_tokens, seq_len) if s.numel() == seq_len]
    if not seqs:
        raise DataError(f"calibration text too short for one sequence of {seq_len} tokens")
    return torch.stack(seqs)


@torch.no_grad()
def _capture(model, module, layout, seqs: torch.Tensor, batch: int):
    """Routed pairs reaching ``module``: ``(x (N, H), top_k_index (N, k), top_k_weights (N, k))``
    (:class:`~moecore.calibration.ExpertsInputHook`, whatever the layout's call convention);
    the forward stops at the module."""
    keep = ExpertsInputHook(store_device=next(module.parameters()).device, layout=layout)

    def hook(mod, args, kwargs):
        keep(mod, args, kwargs)
        raise _Stop

    h = module.register_forward_pre_hook(hook, with_kwargs=True)
    dev = next(model.parameters()).device
    try:
        for i in range(0, seqs.shape[0], batch):
            try:
                model(input_ids=seqs[i:i + batch].to(dev))
            except _Stop:
                pass
    finally:
        h.remove()
    return tuple(torch.cat([g[j] for g in keep.got]) for j in range(3))


def _trainable(module, train_core: bool, compressed: bool) -> list[torch.nn.Parameter]:
    out = []
    for n, p in module.named_parameters():
        if not compressed or n.startswith(FACTOR_MARKERS) or (train_core and n.startswith(CORE_MARKER)):
            out.append(p)
    return out


@torch.no_grad()
def _rel_mse(module, layout, x, idx, w, y, chunk: int = 4096) -> float:
    err = sum(float((layout.routed_forward(module, x[i:i + chunk], idx[i:i + chunk], w[i:i + chunk])
                     - y[i:i + chunk]).pow(2).sum()) for i in range(0, x.shape[0], chunk))
    return err / max(float(y.pow(2).sum()), 1e-30)


def recover(teacher, student, cfg: RecoveryConfig | None = None, *, calibration: Iterable[str] | None = None,
            tokenizer=None, progress: bool = True) -> RecoveryReport:
    """Fit every compressed experts block of ``student`` (in place) to the original block.

    Args:
        teacher: the ORIGINAL model directory (expert weights read layer by layer with
            ``safe_open``) or an in-memory original model (its experts modules are used).
        student: the compressed model (a plain model works too: all its expert weights train).
        cfg: the :class:`~moecore.config.RecoveryConfig` (default: its defaults).
        calibration: texts or a :class:`~moecore.data.TextFile`; default: the bundled
            ``calib`` split (never the held-out one).
        tokenizer: required unless ``teacher`` is a directory holding one.
        progress: show a progress bar.
    Returns a :class:`RecoveryReport` (relative output MSE per layer before / after).
    """
    cfg = RecoveryConfig() if cfg is None else cfg
    if not isinstance(cfg, RecoveryConfig):
        raise ConfigError(f"cfg must be a RecoveryConfig, got {type(cfg).__name__}")
    loader = None
    if isinstance(teacher, (str, Path)):
        loader = OriginalExpertsLoader(teacher)
        if tokenizer is None:
            tokenizer = load_tokenizer(teacher, loader.skeleton.config)
    if tokenizer is None:
        raise ConfigError("recover needs a tokenizer when the teacher is a module")
    texts = calibration if calibration is not None else load_split("calib")
    seqs = _calibration_ids(tokenizer, texts, cfg.max_tokens, cfg.seq_len)
    compressed = is_compressed(student, recurse=True)
    layouts = {path: layout for path, _, layout in find_experts(student, "all", required=False)}
    paths = list(layouts)
    if not paths:
        raise ConfigError("the student has no MoE experts modules")
    tname = f"teacher {teacher}" if loader is not None else "the teacher"
    # same vocabulary and MoE shapes; a module teacher also gets a finite-logits probe (a directory
    # teacher is never loaded whole: its experts are checked layer by layer below)
    check_teacher(loader.skeleton if loader is not None else teacher, student, seqs[:1], name=tname)
    gen = torch.Generator().manual_seed(cfg.seed)
    was_training = student.training
    student.eval()
    flags = {n: p.requires_grad for n, p in student.named_parameters()}
    for p in student.parameters():
        p.requires_grad_(False)
    report = RecoveryReport(tokens=int(seqs.numel()), steps=cfg.steps)
    try:
        for path in progress_bar(paths, desc="moecore: recovering", unit="layer", enabled=progress):
            t0 = time.time()
            module = student.get_submodule(path)
            dev = next(module.parameters()).device
            layout = layouts[path]
            x, idx, w = _capture(student, module, layout, seqs, cfg.forward_batch)
            orig = loader.experts(path) if loader is not None else teacher.get_submodule(path)
            orig = orig.to(device=dev, dtype=x.dtype)
            for pname, p in orig.named_parameters():
                check_finite(p.detach(), f"{tname}: weights {path}.{pname}")
            with torch.no_grad():
                y = torch.cat([layout.routed_forward(orig, x[i:i + 4096], idx[i:i + 4096], w[i:i + 4096])
                               for i in range(0, x.shape[0], 4096)])
            del orig
            check_finite(x, f"the student's inputs to {path}")
            check_finite(y, f"{tname}: outputs of {path}")
            # fit on 4 of every 5 calibration sequences, judge on the 5th (held back from the fit; the
            # sequences are spread over the whole calibration text, so both parts cover every source):
            # small calibration sets overfit, and a layer is only kept if it improved on tokens it never saw
            held = (torch.arange(x.shape[0], device=x.device) // cfg.seq_len) % 5 == 4  # (N,)
            if int(held.sum()) < 16 or bool(held.all()):
                held = torch.zeros_like(held)
            fit_rows = (~held).nonzero().squeeze(1)  # (n_fit,)
            val = (x[held], idx[held], w[held], y[held]) if bool(held.any()) else (x, idx, w, y)
            x, idx, w, y = x[fit_rows], idx[fit_rows], w[fit_rows], y[fit_rows]
            n_fit = x.shape[0]
            before, val_before = _rel_mse(module, layout, x, idx, w, y), _rel_mse(module, layout, *val)
            if not (math.isfinite(before) and math.isfinite(val_before)):
                raise TrainingError(f"the student's {path} gives a non-finite output error ({before}); stopping")
            params = _trainable(module, cfg.train_core, compressed)
            after, val_after = before, val_before
            if cfg.steps and params:
                start = [p.detach().clone() for p in params]
                for p in params:
                    p.requires_grad_(True)
                opt = torch.optim.Adam(params, lr=cfg.lr)
                scale = y.pow(2).mean().clamp_min(1e-30)
                for _ in range(cfg.steps):
                    sel = torch.randint(0, n_fit, (min(cfg.batch_tokens, n_fit),), generator=gen).to(dev)
                    loss = (layout.routed_forward(module, x[sel], idx[sel], w[sel]) - y[sel]).pow(2).mean() / scale
                    if not bool(torch.isfinite(loss)):
                        raise TrainingError(f"non-finite relative MSE ({float(loss)}) while fitting {path}; "
                                            "stopping, nothing written")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                for p in params:
                    p.requires_grad_(False)
                after, val_after = _rel_mse(module, layout, x, idx, w, y), _rel_mse(module, layout, *val)
                if val_after > val_before:  # never make a layer worse on unseen tokens: restore the start
                    with torch.no_grad():
                        for p, s0 in zip(params, start):
                            p.copy_(s0)
                    after, val_after = before, val_before
                del start, opt
            report.layers.append({"path": path, "rel_mse_before": before, "rel_mse_after": after,
                                  "val_rel_mse_before": val_before, "val_rel_mse_after": val_after,
                                  "params": sum(p.numel() for p in params), "seconds": round(time.time() - t0, 3)})
            del x, idx, w, y, val
    finally:
        for n, p in student.named_parameters():
            p.requires_grad_(flags[n])
        student.train(was_training)
    return report
