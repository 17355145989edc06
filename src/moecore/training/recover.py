"""Layer-wise local recovery: fit each compressed experts block to the original block.

One pass over the student's decoder layers, the same per-layer code as the layer engine
(:mod:`moecore.engine`, :mod:`moecore.block_recovery`): the embeddings run once to get the
first layer's inputs and every layer's call arguments
(:func:`~moecore.calibration.capture_layer_inputs`); then for each layer in order its
experts' inputs are captured on the current activations (a forward stopped at the experts
module: attention and router only), the original block's output on them is computed (the
router is shared, so the original block sees the same routing), the compressed block's
factors are fitted to it by Adam (relative MSE, kept only if held-out sequences improved),
and the now recovered layer runs once to give the next layer's inputs.  Inputs therefore
come from the recovered student itself, so later layers are fitted to the activations they
will actually see (errors of earlier layers included), at a cost linear in depth: per
calibration batch, at most one complete forward per decoder layer (none for the last) plus
one stopped capture per layer with experts.

Memory: the student plus ONE original experts layer, read from the teacher's safetensors
(:class:`OriginalExpertsLoader`), plus one layer's calibration activations.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

import torch

from ..block_recovery import block_targets, heldout_rows, sequence_ids, train_block
from ..calibration import calibrate_layer, capture_layer_inputs, restore_layer, run_layer, widen_layer
from ..config import RecoveryConfig
from ..data import calibration_sequences, load_split
from ..engine import experts_by_layer, make_batches
from ..errors import ConfigError, DataError, UnsupportedModelError
from ..modeling import load_tokenizer
from ..progress import progress_bar
from .guards import check_finite, check_teacher
from .originals import OriginalExpertsLoader


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

    Stages: :func:`_resolve` (config, teacher, tokenizer, calibration sequences, the student's
    experts modules, the teacher checks), then the layers in one pass (:func:`_run`) with the
    student frozen and in eval mode (:func:`_frozen`), restored after, whatever happens.
    """
    job = _resolve(teacher, student, cfg, calibration, tokenizer)
    with _frozen(student):
        return _run(job, teacher, student, progress)


@dataclass
class _Job:
    """What :func:`_resolve` found."""
    cfg: RecoveryConfig
    loader: OriginalExpertsLoader | None  # a directory teacher's experts, one layer at a time
    seqs: torch.Tensor  # (N, seq_len) calibration ids
    stack_path: str
    stack: torch.nn.ModuleList
    by_layer: dict
    tname: str  # the teacher, as messages name it


def _resolve(teacher, student, cfg, calibration, tokenizer) -> _Job:
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
    try:
        stack_path, stack, by_layer = experts_by_layer(student, "all")
    except UnsupportedModelError as exc:
        raise ConfigError("the student has no MoE experts modules") from exc
    tname = f"teacher {teacher}" if loader is not None else "the teacher"
    # same vocabulary and MoE shapes; a module teacher also gets a finite-logits probe (a directory
    # teacher is never loaded whole: its experts are checked layer by layer below)
    check_teacher(loader.skeleton if loader is not None else teacher, student, seqs[:1], name=tname)
    return _Job(cfg, loader, seqs, stack_path, stack, by_layer, tname)


@contextlib.contextmanager
def _frozen(student):
    """``student`` in eval mode with no parameter requiring a gradient (block recovery turns on
    only what it trains); both restored on exit."""
    was_training = student.training
    student.eval()
    flags = {n: p.requires_grad for n, p in student.named_parameters()}
    for p in student.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for n, p in student.named_parameters():
            p.requires_grad_(flags[n])
        student.train(was_training)


def _run(job: _Job, teacher, student, progress: bool) -> RecoveryReport:
    """The one pass over the layers (module docstring); the report."""
    cfg, stack, by_layer = job.cfg, job.stack, job.by_layer
    report = RecoveryReport(tokens=int(job.seqs.numel()), steps=cfg.steps)
    dev = next(student.parameters()).device
    batches = make_batches(list(job.seqs), cfg.forward_batch)
    shapes = [tuple(b.shape) for b in batches]
    order = [(i, rel) for i in sorted(by_layer) for rel, _ in by_layer[i]]
    last = max(by_layer)
    hidden, calls = capture_layer_inputs(student, stack, batches, dev)  # the embeddings, no layer
    for i in progress_bar(range(last + 1), desc="moecore: recovering", unit="layer", enabled=progress):
        layer, mods = stack[i], by_layer.get(i, [])
        saved = widen_layer(layer, dev)  # on a CPU: a half-precision layer computed (and trained) in float32
        fdt = torch.float32 if saved else None
        try:
            hooks = calibrate_layer(layer, mods, hidden, calls[i], dev, keep_outputs=False, store_device=dev,
                                    float_dtype=fdt)[0] if mods else {}
            for rel, layout in mods:
                path = f"{job.stack_path}.{i}.{rel}"
                report.layers.append(_recover_module(
                    path, layer.get_submodule(rel), layout, hooks.pop(rel), shapes, teacher, job.loader, job.tname,
                    cfg, cfg.seed + order.index((i, rel))))
            if i < last:  # the recovered layer gives the next layer's inputs
                with torch.no_grad():
                    hidden = [run_layer(layer, h, calls[i][b], dev, fdt).to(h.device) for b, h in enumerate(hidden)]
        finally:
            restore_layer(layer, saved)
    return report


def _recover_module(path, module, layout, hook, shapes, teacher, loader, tname, cfg: RecoveryConfig,
                    seed: int) -> dict:
    """Fit one experts module of the student to the original one on its captured rows; its report row."""
    t0 = time.time()
    x, idx, w = hook.rows()  # (N, H), (N, k), (N, k) on the module's device
    check_finite(x, f"the student's inputs to {path}")
    orig = loader.experts(path) if loader is not None else teacher.get_submodule(path)
    orig = orig.to(device=x.device, dtype=x.dtype)
    for pname, p in orig.named_parameters():
        check_finite(p.detach(), f"{tname}: weights {path}.{pname}")
    y = block_targets(orig, layout, x, idx, w)  # (N, H)
    del orig
    check_finite(y, f"{tname}: outputs of {path}")
    # fit on 4 of every 5 calibration sequences, judge on the 5th (held back from the fit; the
    # sequences are spread over the whole calibration text, so both parts cover every source):
    # small calibration sets overfit, and a layer is only kept if it improved on tokens it never saw
    held = heldout_rows(sequence_ids(hook.rows_per_call(), shapes)).to(x.device)
    rep = train_block(module, layout, x, idx, w, y, held, steps=cfg.steps, lr=cfg.lr,
                      batch_tokens=cfg.batch_tokens, train_core=cfg.train_core, seed=seed,
                      where=f"the student's {path}", memory_gb=cfg.memory_gb)
    return {"path": path, **rep, "seconds": round(time.time() - t0, 3)}
