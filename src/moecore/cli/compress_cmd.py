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
    q = p.add_argument_group("quantized storage (delta form; moecore.quant)")
    q.add_argument("--core-bits", type=int, help="store the cores in 2/3/4/8-bit groups")
    q.add_argument("--factor-bits", type=int, help="store the factors in 2/3/4/8-bit groups (refit after the core)")
    q.add_argument("--quant-group", type=int, default=64, help="weights per scale/zero point (default 64)")
    q.add_argument("--quant-method", choices=["hqq", "rtn"], default="hqq")


def quant_arg(args) -> dict | None:
    """``CompressionConfig.quant`` from ``--core-bits`` / ``--factor-bits`` (None: float storage)."""
    if getattr(args, "core_bits", None) is None and getattr(args, "factor_bits", None) is None:
        return None
    return {"core_bits": args.core_bits, "factor_bits": args.factor_bits, "group_size": args.quant_group,
            "method": args.quant_method}


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
    p.add_argument("--svd", choices=["auto", "exact", "randomized"], default="auto",
                   help="truncated SVD: auto = exact up to 512 on the short side, randomized (warm-started) above")
    p.add_argument("--propagate", choices=["compressed", "original"], default="original",
                   help="calibrate each layer on the original (default) or the compressed earlier layers (sequential)")
    p.add_argument("--calib-tokens", type=int, default=None, help="calibration tokens (default 32768)")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="dtype to load and store the model in")
    p.add_argument("--device", default="auto", help="where layers are calibrated and fitted: auto (cuda if "
                   "available), cpu, cuda, cuda:1, ...")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run of the same job from its first unfinished layer")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--quiet", action="store_true", help="no statistics table")
    p.set_defaults(func=run)


def run(args) -> int:
    """Stream the checkpoint through the layer engine (one decoder layer in memory at a time)."""
    import torch

    from moecore import CompressionConfig
    from moecore.api import compress_checkpoint
    from moecore.data import TextFile
    from moecore.stats import STATS_FILENAME, print_table, read_statistics_yaml

    kw = {"form": args.form, "rank": args.rank, "target_ratio": args.target_ratio, "core": args.core,
          "init": args.init, "allocation": args.allocation, "svd": args.svd, "propagate": args.propagate,
          "quant": quant_arg(args)}
    if args.refine_steps is not None:
        kw["refine_steps"] = args.refine_steps
    if args.calib_tokens is not None:
        kw["calib_max_tokens"] = args.calib_tokens
    cfg = CompressionConfig(**kw)  # validates rank / ratio before any heavy work
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    calib = TextFile(args.calib) if args.calib else None  # streamed: only what calibration needs is read
    status(f"compressing {args.model} layer by layer on {device} ({cfg.form}, "
           + (f"rank {cfg.rank}" if cfg.rank else f"target ratio {cfg.target_ratio}")
           + (f", calibration from {args.calib}" if calib else "") + ")")
    res = compress_checkpoint(args.model, args.output, cfg, calib, device=device, dtype=torch_dtype(args.dtype),
                              resume=args.resume, overwrite=args.overwrite, calibration_path=args.calib)
    t = res["timings"]
    if t:
        tot = {k: sum(r[k] for r in t) for k in ("load_s", "calibrate_s", "fit_s", "propagate_s", "write_s")}
        status(f"{len(t)} layer(s) in {sum(tot.values()):.1f} s: " + ", ".join(
            f"{k[:-2]} {v:.1f} s" for k, v in tot.items()))
    if not args.quiet:
        print_table(read_statistics_yaml(Path(res["output"]) / STATS_FILENAME), per_layer=False)
    print(f"saved compressed model to {args.output}")
    return 0
