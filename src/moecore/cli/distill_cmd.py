"""``moecore distill --teacher ORIG [--student STUDENT] -o OUT``: logit distillation.

The training flags are derived from :class:`~moecore.training.config.DistillConfig`'s fields
and the on-the-fly compression flags from :class:`~moecore.config.CompressionConfig`'s; the
config is saved as ``OUT/distill_config.json``."""
from __future__ import annotations

from moecore.config import CompressionConfig
from moecore.io_utils import check_output_path
from moecore.training import distill
from moecore.training.config import DistillConfig

from ._config_args import add_config_args, config_from_args
from .compress_cmd import BUDGET_FIELDS


def register(sub) -> None:
    p = sub.add_parser("distill", help="recover a compressed student by logit distillation from the original")
    p.add_argument("--teacher", required=True, help="original model directory")
    p.add_argument("--student", help="compressed (or plain) student directory; default: compress the teacher "
                   "on the fly with --form/--rank/--target-ratio")
    p.add_argument("-o", "--output", required=True, help="output directory (checkpoints, final/, curves)")
    p.add_argument("--data", help="training text (.txt / .jsonl); default: the bundled train split")
    p.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint in -o")
    add_config_args(p, DistillConfig)
    add_config_args(p, CompressionConfig, only=BUDGET_FIELDS,
                    title="compression of a plain student (or of the teacher without --student)")
    p.set_defaults(func=run)


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
