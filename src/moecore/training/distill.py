"""``moecore.training.distill``: end-to-end logit distillation of a compressed student.

Student resolution (the seed's auto-detection, made explicit):
1. ``resume=True`` and ``output_dir`` holds a complete checkpoint: the student is loaded from
   it (same architecture, same ranks) and the Trainer restores optimizer/scheduler/RNG/state;
2. a directory whose ``config.json`` has ``quantization_config.quant_method == "moecore"``:
   loaded compressed (``from_pretrained`` after ``import moecore``);
3. any other directory or an ``nn.Module``: used as given (a plain student trains its experts);
4. with a ``CompressionConfig``, an uncompressed student (or a copy of the teacher when
   ``student=None``) is compressed on the fly with the bundled calibration split.

The training settings are one :class:`~moecore.config.DistillConfig`.
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate.utils import gather_object
from transformers import TrainerCallback, TrainingArguments

from ..api import compress
from ..config import DISTILL_CONFIG, CompressionConfig, DistillConfig, RecoveryConfig
from ..data import load_split, token_stream
from ..errors import ConfigError, DataError
from ..io_utils import atomic_write_text, check_output_path, converting_write_errors, user_path
from ..modeling import load_model
from . import checkpoints as ckpt
from .async_eval import EvalWorker, summary_table
from ..families import is_compressed
from .common import BlockDataset, TrainingForms, select_trainable, training_texts
from .guards import check_teacher
from .kd import DistillTrainer, kd_loss
from .plots import plot_training_curves
from .recover import recover

SUMMARY = "distill_summary.json"
CURVES = "training_curves.png"


@dataclass
class DistillResult:
    """What a distillation run did; also written to ``OUT/distill_summary.json``."""
    output_dir: str
    final_dir: str
    global_step: int
    resumed_from: str | None
    trainable: int                    # number of trainable parameters (elements)
    train_loss: float | None          # the last logged training loss
    final_eval_loss: float | None     # KD loss of the final student on the first eval blocks
    checksums: dict[str, float] = field(default_factory=dict)   # float64 sum per trainable tensor
    rank_checksums: list[float] = field(default_factory=list)   # total checksum on every process
    eval_rows: list[dict] = field(default_factory=list)
    eval_error: str | None = None


def _finished(out: Path, cfg: DistillConfig) -> DistillResult | None:
    """The result of a run in ``out`` that already finished (``final/`` and its summary are
    written last), or ``None``.  A finished run is never trained further or rewritten: asking
    for more steps than it ran is a ``ConfigError`` saying how to continue from it."""
    summary = out / SUMMARY
    if not (out / "final" / "config.json").is_file() or not summary.is_file():
        return None
    try:
        data = json.loads(summary.read_text(encoding="utf-8"))
        res = DistillResult(**{f: data[f] for f in DistillResult.__dataclass_fields__ if f in data})
    except (OSError, json.JSONDecodeError, TypeError) as exc:
        raise ConfigError(f"{summary} is unreadable ({exc}); move {out} aside to start over") from exc
    if cfg.max_steps > res.global_step:
        raise ConfigError(f"{out} is a finished run ({res.global_step} steps, final/ written); to train further, "
                          f"start a new run from it: --student {out / 'final'} -o ANOTHER_DIR")
    return res


def _load_teacher(teacher):
    if isinstance(teacher, torch.nn.Module):
        return teacher, None
    return load_model(teacher)


def _resolve_student(student, teacher_model, tok, compression, resume_ckpt):
    if resume_ckpt is not None:
        return load_model(resume_ckpt)[0], f"resumed from {resume_ckpt}"
    if isinstance(student, torch.nn.Module):
        model, how = student, "given module"
    elif student is not None:
        model, how = load_model(student)[0], f"loaded from {student}"
    elif compression is None:
        raise ConfigError("no student: pass a student directory or a CompressionConfig (--form/--rank/--target-ratio)")
    else:
        model, how = copy.deepcopy(teacher_model), "the teacher"
    if compression is not None and not is_compressed(model, recurse=True):
        compress(model, compression, calibration=load_split("calib"), tokenizer=tok)
        how += f", compressed on the fly ({compression.form})"
    return model, how


def _recover_first(teacher, teacher_model, student_model, tok, cfg: DistillConfig, main: bool) -> None:
    """Layer-wise local recovery of the student before KD (``cfg.recover_steps`` per layer)."""
    rep = recover(teacher if isinstance(teacher, (str, Path)) else teacher_model, student_model,
                  RecoveryConfig(steps=cfg.recover_steps, seed=cfg.seed), tokenizer=tok, progress=main)
    if main:
        for row in rep.layers:
            print(f"moecore recover: {row['path']}: relative MSE {row['rel_mse_before']:.4g} -> "
                  f"{row['rel_mse_after']:.4g}", flush=True)


def _blocks(tok, data, block_size: int, needed_tokens: int) -> torch.Tensor:
    """Packed blocks from ``data`` (or the train split), tokenized only as far as needed."""
    ids = token_stream(tok, training_texts(data), min_tokens=needed_tokens + block_size)
    n = ids.numel() // block_size
    if n == 0:
        raise DataError(f"not enough text for one block of {block_size} tokens ({ids.numel()} tokens)")
    return ids[: n * block_size].view(n, block_size)


def checksums(model, names: list[str]) -> dict[str, float]:
    """float64 sum of every named parameter (a cheap fingerprint to compare saved results)."""
    params = dict(model.named_parameters())
    return {n: float(params[n].detach().double().sum().item()) for n in names}


@torch.no_grad()
def eval_kd_loss(student, teacher, blocks: torch.Tensor, temperature: float, alpha: float) -> float:
    """The distillation loss of ``student`` on ``blocks`` (B, L), in eval mode, one batch."""
    was = student.training
    student.eval()
    dev = next(student.parameters()).device
    x = blocks.to(dev)
    loss, _ = kd_loss(student(input_ids=x).logits, teacher.to(dev)(input_ids=x).logits, x, temperature, alpha)
    student.train(was)
    return float(loss.item())


class _Monitor(TrainerCallback):
    """Redraws the loss curves at each save/end, and reports an async-eval worker crash once."""

    def __init__(self, out: Path, worker=None):
        self.out, self.worker = out, worker

    def _check(self):
        msg = self.worker.crashed() if self.worker is not None else None
        if msg:
            print(f"moecore distill: warning: {msg}", flush=True)

    def on_log(self, args, state, control, **kw):
        self._check()

    def on_save(self, args, state, control, **kw):
        self._check()
        if args.should_save:
            plot_training_curves(state.log_history, self.out / CURVES)


def distill(teacher, student=None, output_dir: str | Path = "distilled", cfg: DistillConfig | None = None, *,
            compression: CompressionConfig | None = None, data: str | Path | None = None,
            resume: bool = False) -> DistillResult:
    """Distil ``teacher`` (a directory or model) into ``student`` with :class:`DistillTrainer`.

    Args:
        teacher: the original model directory (or an in-memory model).
        student: a student directory or module, or ``None`` (a copy of the teacher, compressed
            with ``compression``); see the module docstring for how it is resolved.
        output_dir: the run folder.
        cfg: the :class:`~moecore.config.DistillConfig` (default: its defaults).
        compression: compresses an uncompressed student on the fly (bundled calibration split).
        data: training text file (default: the bundled ``train`` split).
        resume: continue from the last complete checkpoint in ``output_dir`` (from scratch,
            with a note, if there is none).

    Checkpoints (compressed format, complete only after an atomic rename) are written every
    ``cfg.save_steps`` steps and at the end to ``OUT/checkpoint-N``; the final student goes to
    ``OUT/final``, the curves to ``OUT/training_curves.png``, the config to
    ``OUT/distill_config.json``, a summary to ``OUT/distill_summary.json``.
    ``cfg.recover_steps`` runs layer-wise local recovery on the student first;
    ``cfg.eval_async`` starts the background evaluator (:mod:`moecore.training.async_eval`).
    Works under ``accelerate launch``.

    Four stages: :func:`_resolve` (inputs checked, the run folder's state: finished, resumable,
    fresh), :func:`_prepare` (models, trainable tensors, data, the run folder), :func:`_train`
    (the HF Trainer, with the evaluator alongside) and :func:`_publish` (``final/``, curves,
    summary).
    """
    run = _resolve(teacher, student, output_dir, cfg, compression, data, resume)
    if isinstance(run, DistillResult):
        return run
    prep = _prepare(run, teacher, student, compression, data)
    try:
        trainer, worker = _train(run, prep)
        return _publish(run, prep, trainer, worker)
    finally:
        prep.forms.restore()  # a student passed in holds its stored modules again, trained or not


@dataclass
class _Run:
    """What :func:`_resolve` found: the run folder and whether (and from where) it resumes."""
    out: Path
    cfg: DistillConfig
    resume: bool
    last: Path | None  # the checkpoint resumed from
    saved_cfg: DistillConfig | None  # the config an earlier run of this folder saved


@dataclass
class _Prepared:
    """What :func:`_prepare` built for training."""
    args: TrainingArguments
    teacher: torch.nn.Module
    student: torch.nn.Module
    tok: object
    how: str  # how the student was obtained (printed, and in the summary)
    names: list[str]  # trainable tensors (of the student in training form)
    forms: TrainingForms  # the student's modules in their training form while it trains
    n_train: int
    blocks: torch.Tensor  # (N, block_size) training token ids
    world: int


def _resolve(teacher, student, output_dir, cfg, compression, data, resume: bool) -> _Run | DistillResult:
    """Check the inputs; a finished run's result, or the run to do."""
    cfg = DistillConfig() if cfg is None else cfg
    if not isinstance(cfg, DistillConfig):
        raise ConfigError(f"cfg must be a DistillConfig, got {type(cfg).__name__}")
    if compression is not None and not isinstance(compression, CompressionConfig):
        raise ConfigError(f"compression must be a CompressionConfig, got {type(compression).__name__}")
    out = Path(output_dir)
    # the run directory may never be, contain or lie inside an input (its checkpoints rotate)
    check_output_path(out, [t for t in (teacher, student, data) if isinstance(t, (str, Path))])
    done = _finished(out, cfg) if resume else None
    if done is not None:
        print(f"moecore distill: {out} already finished at step {done.global_step} ({out / 'final'}); "
              "nothing to do", flush=True)
        return done
    last = ckpt.last_checkpoint(out) if resume else None
    if not resume and ckpt.complete_checkpoints(out):
        raise ConfigError(f"{out} already holds checkpoints; pass --resume to continue, or choose another -o")
    saved_cfg = DistillConfig.load(out) if resume and (out / DISTILL_CONFIG).is_file() else None
    return _Run(out, cfg, resume, last, saved_cfg)


def _prepare(run: _Run, teacher, student, compression, data) -> _Prepared:
    """Models (student resolved, compressed or recovered as asked), trainable tensors, training
    blocks, the checks between teacher and student; the run folder and its config written."""
    cfg, out, last = run.cfg, run.out, run.last
    args = TrainingArguments(
        output_dir=str(out), max_steps=cfg.max_steps, per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.lr, lr_scheduler_type=cfg.scheduler,
        warmup_steps=cfg.warmup_steps, weight_decay=0.0, logging_steps=cfg.logging_steps, save_strategy="steps",
        save_steps=cfg.save_steps, save_total_limit=cfg.save_total_limit, report_to="none", seed=cfg.seed,
        data_seed=cfg.seed, use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
        ddp_find_unused_parameters=False, remove_unused_columns=False)
    teacher_model, tok = _load_teacher(teacher)
    if tok is None:
        if student is None or isinstance(student, torch.nn.Module):
            raise ConfigError("pass a teacher directory (for its tokenizer) when the teacher is a module")
        tok = load_model(student)[1]
    student_model, how = _resolve_student(student, teacher_model, tok, compression, last)
    if cfg.recover_steps and last is None:
        _recover_first(teacher, teacher_model, student_model, tok, cfg, args.should_save)
        how += f", recovered layer-wise ({cfg.recover_steps} steps per layer)"
    world = max(args.world_size, 1)
    needed = cfg.max_steps * cfg.batch_size * cfg.grad_accum * world * cfg.block_size
    blocks = _blocks(tok, data, cfg.block_size, needed)
    check_teacher(teacher_model, student_model, blocks[:1],
                  name=f"teacher {teacher}" if isinstance(teacher, (str, Path)) else "the teacher")
    forms = TrainingForms(student_model)  # e.g. ragged factors trained padded, as the delta form's
    try:
        # the cores train "as well as the factors": router-only KD (train_factors off) keeps them frozen
        names = select_trainable(student_model, train_core=cfg.train_core and cfg.train_factors,
                                 train_router=cfg.train_router, train_factors=cfg.train_factors)
        n_train = sum(p.numel() for p in student_model.parameters() if p.requires_grad)
        if args.should_save:
            with user_path(out, "write"):
                out.mkdir(parents=True, exist_ok=True)
            with converting_write_errors(out):
                ckpt.clean_staging(out)
                cfg.save(out)
            print(f"moecore distill: student {how}; {len(names)} trainable tensors ({n_train:,} params); "
                  f"{blocks.shape[0]} blocks of {cfg.block_size} tokens; {world} process(es)", flush=True)
            if run.resume and last is None:
                print(f"moecore distill: no complete checkpoint in {out}; starting from scratch", flush=True)
            changed = cfg.changes(run.saved_cfg) if run.saved_cfg is not None else {}
            if changed:
                print("moecore distill: resuming with changed settings: "
                      + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()), flush=True)
    except BaseException:
        forms.restore()
        raise
    return _Prepared(args, teacher_model, student_model, tok, how, names, forms, n_train, blocks, world)


def _train(run: _Run, prep: _Prepared) -> tuple[DistillTrainer, EvalWorker | None]:
    """The HF Trainer's run (resumed from ``run.last``), with the background evaluator."""
    cfg, out = run.cfg, run.out
    worker = None
    if cfg.eval_async and prep.args.should_save:
        worker = EvalWorker(out, max_tokens=cfg.eval_max_tokens, tasks=cfg.eval_tasks, limit=cfg.eval_limit).start()
    trainer = DistillTrainer(model=prep.student, args=prep.args, train_dataset=BlockDataset(prep.blocks),
                             processing_class=prep.tok, teacher=prep.teacher, temperature=cfg.temperature,
                             alpha=cfg.alpha, block_weight=cfg.experts_loss_weight, callbacks=[_Monitor(out, worker)],
                             stored_view=prep.forms.stored)
    try:
        with converting_write_errors(out):
            trainer.train(resume_from_checkpoint=str(run.last) if run.last else None)
    except BaseException:
        if worker is not None:
            worker.finish(timeout=60)
        raise
    return trainer, worker


def _publish(run: _Run, prep: _Prepared, trainer: DistillTrainer, worker: EvalWorker | None) -> DistillResult:
    """``final/`` (staged, then renamed), curves, the final KD loss, the evaluator's rows and
    ``distill_summary.json``; on every process, the checksums of the trained tensors."""
    cfg, out, last = run.cfg, run.out, run.last
    final = out / "final"
    staging = out / ".tmp-final"
    with converting_write_errors(out):
        trainer.save_model(str(staging))
    trainer._barrier()
    names = prep.forms.stored_names(prep.names)
    prep.forms.restore()  # the checksums and the final loss of the stored student
    model = trainer.accelerator.unwrap_model(trainer.model)
    sums = checksums(model, names)
    total = sum(sums.values())
    rank_sums = [total]
    if prep.world > 1:
        rank_sums = gather_object([total])
    if not prep.args.should_save:
        return DistillResult(str(out), str(final), trainer.state.global_step, str(last) if last else None,
                             prep.n_train, None, None, sums, rank_sums)
    with converting_write_errors(out):
        ckpt.publish(staging, final)
        plot_training_curves(trainer.state.log_history, out / CURVES)
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    final_loss = eval_kd_loss(model, prep.teacher, prep.blocks[:cfg.eval_blocks], cfg.temperature, cfg.alpha)
    res = DistillResult(str(out), str(final), trainer.state.global_step, str(last) if last else None, prep.n_train,
                        losses[-1] if losses else None, final_loss, sums, rank_sums)
    if worker is not None:
        fin = worker.finish()
        res.eval_rows, res.eval_error = fin["rows"], fin["error"]
        print(summary_table(res.eval_rows, res.eval_error), flush=True)
    summary = asdict(res)
    summary.update(temperature=cfg.temperature, alpha=cfg.alpha, lr=cfg.lr, block_size=cfg.block_size,
                   batch_size=cfg.batch_size, world_size=prep.world, student=prep.how, config=cfg.to_dict())
    with converting_write_errors(out):
        atomic_write_text(out / SUMMARY, json.dumps(summary, indent=2, default=_json_default))
    return res


def _json_default(x):
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return str(x)
