"""``moecore plan CONFIG.json ...``: compression statistics from configs alone (no weights),
the output's size on disk at ``--dtype`` (default bfloat16) and the peak host / GPU memory
``moecore compress`` needs for the largest layer (:func:`moecore.planning.memory_estimate`)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from moecore.config import CompressionConfig
from moecore.planning import plan
from moecore.stats import print_table

from ._config_args import config_from_args
from .commands import BUDGET_FIELDS


def config_name(path: str) -> str:
    """What a plan is called: a folder's name, the folder of a ``config.json``, or the stem of
    any other ``NAME.json``."""
    p = Path(path)
    if p.is_dir() or p.name == "config.json":
        return (p if p.is_dir() else p.parent).resolve().name
    return p.stem


def memory_line(name: str, p: dict) -> str:
    m = p["memory_estimate"]
    return (f"{name}: output {m['output_gb']:.2f} GB on disk ({m['dtype']}); compress peak for its largest layer "
            f"({m['layer']}): GPU {m['gpu_gib']:.1f} GiB + host {m['host_gib_with_gpu']:.1f} GiB with --device cuda, "
            f"or host {m['host_gib_cpu_only']:.1f} GiB on CPU"
            + (f", with {m['grams_on_disk_gib']:.1f} GiB of Grams in a scratch file on disk"
               if m.get("grams_on_disk_gib") else "") + " (estimate, moecore.planning)")


def run(args) -> int:
    cfg = config_from_args(CompressionConfig, args, only=BUDGET_FIELDS)
    plans = [(c, plan(c, cfg, dtype=args.dtype)) for c in args.configs]
    for c, p in plans:
        if p.get("source_quantization"):
            print(f"moecore plan: warning: {c} describes a checkpoint stored quantized ({p['source_quantization']}): "
                  f"its sizes here are those of {args.dtype} weights, which moecore compress needs (dequantize "
                  f"first)", file=sys.stderr)
    if args.json:
        print(json.dumps({c: p for c, p in plans}, indent=2, default=str))
        return 0
    for c, p in plans:
        print_table(p, per_layer=args.per_layer)
        print(memory_line(config_name(c), p))
    if len(plans) > 1:
        t = Table(title=f"plan summary ({cfg.form})")
        for col in ("config", "ranks", "expert params", "of original", "expert MACs", "model MACs", "expert GB", "output GB"):
            t.add_column(col, no_wrap=True)
        for c, p in plans:
            ranks = sorted({pr["rank"] for L in p["layers"] for pr in L["projections"].values()})
            t.add_row(config_name(c), ",".join(map(str, ranks)), f"{p['total_params_compressed']:,}",
                      f"{100 * p['total_compression_ratio']:.1f}%", f"{100 * p['active_macs_ratio']:.1f}%",
                      f"{100 * p['model']['macs_ratio']:.1f}%", f"{p['total_memory_compressed_gb']:.2f}",
                      f"{p['memory_estimate']['output_gb']:.2f}")
        Console().print(t)
    return 0
