"""``moecore distill --teacher ORIG [--student STUDENT] -o OUT``: logit distillation.

The training flags (:mod:`moecore.cli.commands`) are derived from
:class:`~moecore.config.DistillConfig`'s fields and the on-the-fly compression flags from
:class:`~moecore.config.CompressionConfig`'s; the config is saved as ``OUT/distill_config.json``."""
from __future__ import annotations

from moecore.config import CompressionConfig, DistillConfig
from moecore.io_utils import check_output_path
from moecore.training import distill

from ._config_args import config_from_args
from .commands import BUDGET_FIELDS


def run(args) -> int:
    cfg = config_from_args(DistillConfig, args)  # validated before any heavy work
    compression = config_from_args(CompressionConfig, args, only=BUDGET_FIELDS, none_if_unset=args.student is not None)
    check_output_path(args.output, [args.teacher, args.student, args.data])
    res = distill(args.teacher, args.student, args.output, cfg, compression=compression, data=args.data,
                  resume=args.resume)
    if res.final_eval_loss is not None:  # the main process
        last = "n/a" if res.train_loss is None else f"{res.train_loss:.4f}"
        print(f"moecore distill: {res.global_step} steps, last logged loss {last}, "
              f"final eval KD loss {res.final_eval_loss:.4f}; student saved to {res.final_dir}")
    return 0
