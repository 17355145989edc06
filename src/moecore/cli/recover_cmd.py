"""``moecore recover --teacher ORIG --student STUDENT -o OUT``: layer-wise local recovery.

The recovery flags (:mod:`moecore.cli.commands`) are derived from
:class:`~moecore.config.RecoveryConfig`'s fields;
the config is saved as ``recovery_config.json`` in the output checkpoint."""
from __future__ import annotations

import json

from moecore.data import TextFile
from moecore.errors import ConfigError
from moecore.families import is_compressed
from moecore.io import save_compressed
from moecore.io_utils import prepare_output
from moecore.modeling import load_model
from moecore.config import RecoveryConfig
from moecore.training import recover

from ._config_args import config_from_args
from .common import resolve_device, torch_dtype


def run(args) -> int:
    cfg = config_from_args(RecoveryConfig, args)  # validated before any heavy work
    device = resolve_device(args.device)
    prepare_output(args.output, [args.teacher, args.student, args.calib], args.overwrite)
    calib = TextFile(args.calib) if args.calib else None
    model, tok = load_model(args.student, dtype=torch_dtype(args.dtype))
    model.to(device)  # recover runs where the student is: the teacher's layers are read onto its device
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
