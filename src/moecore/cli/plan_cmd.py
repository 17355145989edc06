"""``moecore plan CONFIG.json ...``: compression statistics from configs alone (no weights)."""
from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from moecore.config import CompressionConfig
from moecore.planning import plan
from moecore.stats import print_table

from ._config_args import config_from_args
from .commands import BUDGET_FIELDS


def run(args) -> int:
    cfg = config_from_args(CompressionConfig, args, only=BUDGET_FIELDS)
    plans = [(c, plan(c, cfg, dtype=args.dtype)) for c in args.configs]
    if args.json:
        print(json.dumps({c: p for c, p in plans}, indent=2, default=str))
        return 0
    for _c, p in plans:
        print_table(p, per_layer=args.per_layer)
    if len(plans) > 1:
        t = Table(title=f"plan summary ({cfg.form})")
        for col in ("config", "ranks", "expert params", "of original", "expert MACs", "model MACs", "expert GB"):
            t.add_column(col, no_wrap=True)
        for c, p in plans:
            ranks = sorted({pr["rank"] for L in p["layers"] for pr in L["projections"].values()})
            name = Path(c).stem if Path(c).suffix == ".json" and Path(c).stem != "config" else Path(c).resolve().parent.name
            t.add_row(name, ",".join(map(str, ranks)), f"{p['total_params_compressed']:,}",
                      f"{100 * p['total_compression_ratio']:.1f}%", f"{100 * p['active_macs_ratio']:.1f}%",
                      f"{100 * p['model']['macs_ratio']:.1f}%", f"{p['total_memory_compressed_gb']:.2f}")
        Console().print(t)
    return 0
