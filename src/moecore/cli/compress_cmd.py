"""``moecore compress MODEL -o OUT``: compress a model directory's experts and save it."""
from __future__ import annotations

import sys
from pathlib import Path

DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_budget_args(p) -> None:
    """``--form`` and the mutually exclusive ``--rank`` / ``--target-ratio`` (shared with plan)."""
    p.add_argument("--form", choices=["delta", "wrapper"], default="delta",
                   help="delta: W_i = C + A_i B_i^T (core once per token); wrapper: the seed's form")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--rank", type=int, help="the form's rank for every projection")
    g.add_argument("--target-ratio", type=float,
                   help="fraction in (0, 1) of the original expert parameters (default 0.25)")
    p.add_argument("--allocation", choices=["uniform", "greedy"], default="uniform",
                   help="how --target-ratio becomes ranks")


def torch_dtype(name: str | None):
    """``"auto"``/``None`` -> ``"auto"``; else the ``torch.dtype`` of that name."""
    import torch

    if name in (None, "auto"):
        return "auto"
    return getattr(torch, name)


def status(msg: str) -> None:
    """One progress line on stderr."""
    print(f"moecore: {msg}", file=sys.stderr, flush=True)


def register(sub) -> None:
    p = sub.add_parser("compress", help="compress a model's experts (shared core + low-rank factors) and save it")
    p.add_argument("model", help="model directory (config.json + safetensors)")
    p.add_argument("-o", "--output", required=True, help="output directory")
    add_budget_args(p)
    p.add_argument("--calib", help="calibration text file (.txt / .jsonl / .jsonl.xz): activation-aware init")
    p.add_argument("--core", choices=["auto", "mean", "frequency", "output"], default="auto",
                   help="core start: auto (frequency with --calib, else mean), mean, router-frequency weighted, "
                        "or output-error optimal")
    p.add_argument("--init", choices=["auto", "svd", "whitened"], default="auto")
    p.add_argument("--refine-steps", type=int, default=None, help="alternating refinement iterations (default 10)")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="dtype to load and store the model in")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--quiet", action="store_true", help="no statistics table")
    p.set_defaults(func=run)


def run(args) -> int:
    from moecore import CompressionConfig, compress, save_compressed, statistics
    from moecore.data import TextFile
    from moecore.io_utils import prepare_output
    from moecore.modeling import load_model
    from moecore.stats import print_table

    kw = {"form": args.form, "rank": args.rank, "target_ratio": args.target_ratio, "core": args.core,
          "init": args.init, "allocation": args.allocation}
    if args.refine_steps is not None:
        kw["refine_steps"] = args.refine_steps
    cfg = CompressionConfig(**kw)  # validates rank / ratio before any heavy work
    out = Path(args.output)
    calib = TextFile(args.calib) if args.calib else None  # streamed: only what calibration needs is read
    prepare_output(out, [args.model, args.calib], args.overwrite)
    status(f"loading {args.model}")
    model, tok = load_model(args.model, dtype=torch_dtype(args.dtype), need_tokenizer=calib is not None)
    status(f"compressing ({cfg.form}, " + (f"rank {cfg.rank}" if cfg.rank else f"target ratio {cfg.target_ratio}")
           + (f", calibration from {args.calib}" if calib else "") + ")")
    model = compress(model, cfg, calibration=calib, tokenizer=tok)
    status(f"saving to {out}")
    save_compressed(model, out, tokenizer=tok, overwrite=args.overwrite, config=cfg)
    if not args.quiet:
        print_table(statistics(model), per_layer=False)
    print(f"saved compressed model to {out}")
    return 0
