"""``moecore compress MODEL -o OUT``: compress a model directory's experts and save it.

The compression flags are derived from :class:`~moecore.config.CompressionConfig`'s fields
(:mod:`moecore.cli._config_args`); only the inputs, outputs and run options are listed here."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from moecore.api import compress_checkpoint
from moecore.config import CompressionConfig
from moecore.data import TextFile
from moecore.errors import ConfigError
from moecore.stats import STATS_FILENAME, print_table, read_statistics_yaml

from ._config_args import add_config_args, config_from_args

DTYPES = ("auto", "float32", "bfloat16", "float16")
# the CompressionConfig fields that ``plan`` and ``distill`` (compressing on the fly) take as flags
BUDGET_FIELDS = ("form", "rank", "target_ratio", "allocation", "quant", "allow_larger")


def torch_dtype(name: str | None):
    """``"auto"``/``None`` -> ``"auto"``; else the ``torch.dtype`` of that name."""
    if name in (None, "auto"):
        return "auto"
    return getattr(torch, name)


def resolve_device(name: str) -> torch.device:
    """``--device``: ``auto`` (cuda if available, else cpu) or a torch device string; a malformed
    or unavailable device is a ``ConfigError``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"--device {name}: not a device (auto, cpu, cuda, cuda:1, ...)") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: there are {torch.cuda.device_count()} CUDA device(s)")
    return dev


def status(msg: str) -> None:
    """One progress line on stderr."""
    print(f"moecore: {msg}", file=sys.stderr, flush=True)


def register(sub) -> None:
    p = sub.add_parser("compress", help="compress a model's experts (shared core + low-rank factors) and save it")
    p.add_argument("model", help="model directory (config.json + safetensors)")
    p.add_argument("-o", "--output", required=True, help="output directory")
    p.add_argument("--calib", help="calibration text file (.txt / .jsonl / .jsonl.xz): activation-aware init")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="dtype to load and store the model in")
    p.add_argument("--device", default="auto", help="where layers are calibrated and fitted: auto (cuda if "
                   "available), cpu, cuda, cuda:1, ...")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run of the same job from its first unfinished layer")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--quiet", action="store_true", help="no statistics table")
    add_config_args(p, CompressionConfig)
    p.set_defaults(func=run)


def run(args) -> int:
    """Stream the checkpoint through the layer engine (one decoder layer in memory at a time)."""
    cfg = config_from_args(CompressionConfig, args)  # validates rank / ratio before any heavy work
    device = resolve_device(args.device)
    calib = TextFile(args.calib) if args.calib else None  # streamed: only what calibration needs is read
    status(f"compressing {args.model} layer by layer on {device} ({cfg.form}, "
           + (f"rank {cfg.rank}" if cfg.rank else f"target ratio {cfg.target_ratio}")
           + (f", calibration from {args.calib}" if calib else "") + ")")
    res = compress_checkpoint(args.model, args.output, cfg, calib, device=device, dtype=torch_dtype(args.dtype),
                              resume=args.resume, overwrite=args.overwrite, calibration_path=args.calib)
    t = res["timings"]
    if t:
        tot = {k: sum(r.get(k, 0.0) for r in t)
               for k in ("load_s", "calibrate_s", "fit_s", "recover_s", "propagate_s", "write_s")}
        status(f"{len(t)} layer(s) in {sum(tot.values()):.1f} s: " + ", ".join(
            f"{k[:-2]} {v:.1f} s" for k, v in tot.items() if v or k != "recover_s"))
    rec = res.get("recovery") or []
    if rec:
        kept = [r for r in rec if r["kept"]]
        status(f"block recovery ({cfg.recover_steps} steps per layer): kept in {len(kept)} of {len(rec)} layer(s); "
               f"held-out block error {sum(r['val_rel_mse_before'] for r in rec) / len(rec):.4g} -> "
               f"{sum(r['val_rel_mse_after'] for r in rec) / len(rec):.4g} (mean relative MSE)")
    if not args.quiet:
        print_table(read_statistics_yaml(Path(res["output"]) / STATS_FILENAME), per_layer=False)
    print(f"saved compressed model to {args.output}")
    return 0
