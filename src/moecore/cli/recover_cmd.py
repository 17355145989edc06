"""``moecore recover --teacher ORIG --student STUDENT -o OUT``: layer-wise local recovery.

The recovery flags are derived from :class:`~moecore.training.config.RecoveryConfig`'s fields;
the config is saved as ``recovery_config.json`` in the output checkpoint."""
from __future__ import annotations

import json

from moecore.data import TextFile
from moecore.errors import ConfigError
from moecore.families import is_compressed
from moecore.io import save_compressed
from moecore.io_utils import prepare_output
from moecore.modeling import load_model
from moecore.training import recover
from moecore.training.config import RecoveryConfig

from ._config_args import add_config_args, config_from_args


def register(sub) -> None:
    p = sub.add_parser("recover", help="fit each compressed experts block to the original block's outputs")
    p.add_argument("--teacher", required=True, help="original model directory (read one layer at a time)")
    p.add_argument("--student", required=True, help="compressed student directory")
    p.add_argument("-o", "--output", required=True, help="where to save the recovered student")
    p.add_argument("--calib", help="calibration text (.txt / .jsonl); default: the bundled calib split")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--json", action="store_true", help="print the per-layer report as JSON")
    add_config_args(p, RecoveryConfig)
    p.set_defaults(func=run)


def run(args) -> int:
    cfg = config_from_args(RecoveryConfig, args)  # validated before any heavy work
    prepare_output(args.output, [args.teacher, args.student, args.calib], args.overwrite)
    calib = TextFile(args.calib) if args.calib else None
    model, tok = load_model(args.student)
    if not is_compressed(model, recurse=True):
        raise ConfigError(f"{args.student} is not a moecore-compressed model (run moecore compress first)")
    rep = recover(args.teacher, model, cfg, calibration=calib, tokenizer=tok)
    save_compressed(model, args.output, tokenizer=tok, overwrite=args.overwrite, extra_configs=[cfg])
    if args.json:
        print(json.dumps(rep.as_dict()))
    else:
        for row in rep.layers:
            print(f"{row['path']}: relative output MSE {row['rel_mse_before']:.4g} -> {row['rel_mse_after']:.4g} "
                  f"({row['seconds']}s)")
        print(f"moecore recover: saved to {args.output}")
    return 0
