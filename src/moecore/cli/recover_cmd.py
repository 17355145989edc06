"""``moecore recover --teacher ORIG --student STUDENT -o OUT``: layer-wise local recovery."""
from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("recover", help="fit each compressed experts block to the original block's outputs")
    p.add_argument("--teacher", required=True, help="original model directory (read one layer at a time)")
    p.add_argument("--student", required=True, help="compressed student directory")
    p.add_argument("-o", "--output", required=True, help="where to save the recovered student")
    p.add_argument("--calib", help="calibration text (.txt / .jsonl); default: the bundled calib split")
    p.add_argument("--steps", type=int, default=200, help="Adam steps per layer")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-tokens", type=int, default=1024, help="tokens per Adam step")
    p.add_argument("--max-tokens", type=int, default=32768, help="calibration tokens (the last 20%% judge each layer)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--train-core", action="store_true", help="also fit the shared cores")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--json", action="store_true", help="print the per-layer report as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from moecore.data import TextFile
    from moecore.errors import ConfigError
    from moecore.io import save_compressed
    from moecore.io_utils import prepare_output
    from moecore.modeling import load_model
    from moecore.training import recover
    from moecore.training.common import is_compressed_model

    prepare_output(args.output, [args.teacher, args.student, args.calib], args.overwrite)
    calib = TextFile(args.calib) if args.calib else None
    model, tok = load_model(args.student)
    if not is_compressed_model(model):
        raise ConfigError(f"{args.student} is not a moecore-compressed model (run moecore compress first)")
    rep = recover(args.teacher, model, calib, tok, steps=args.steps, lr=args.lr, batch_tokens=args.batch_tokens,
                  max_tokens=args.max_tokens, seq_len=args.seq_len, train_core=args.train_core)
    save_compressed(model, args.output, tokenizer=tok, overwrite=args.overwrite)
    if args.json:
        print(json.dumps(rep.as_dict()))
    else:
        for row in rep.layers:
            print(f"{row['path']}: relative output MSE {row['rel_mse_before']:.4g} -> {row['rel_mse_after']:.4g} "
                  f"({row['seconds']}s)")
        print(f"moecore recover: saved to {args.output}")
    return 0
