"""``moecore plan CONFIG.json ...``: compression statistics from configs alone (no weights)."""
from __future__ import annotations

import json
from pathlib import Path


def register(sub) -> None:
    from moecore.cli.compress_cmd import add_budget_args

    p = sub.add_parser("plan", help="statistics of a compression from config.json alone (no weights)")
    p.add_argument("configs", nargs="+", metavar="CONFIG.json", help="transformers config.json (or its folder)")
    add_budget_args(p)
    p.add_argument("--dtype", default=None, help="dtype for bytes (default: the config's)")
    p.add_argument("--per-layer", action="store_true", help="also print one row per layer and projection")
    p.add_argument("--json", action="store_true", help="print the plans as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from moecore import CompressionConfig, plan
    from moecore.stats import print_table

    from moecore.cli.compress_cmd import quant_arg

    cfg = CompressionConfig(form=args.form, rank=args.rank, target_ratio=args.target_ratio, allocation=args.allocation,
                            quant=quant_arg(args))
    plans = [(c, plan(c, cfg, dtype=args.dtype)) for c in args.configs]
    if args.json:
        print(json.dumps({c: p for c, p in plans}, indent=2, default=str))
        return 0
    for _c, p in plans:
        print_table(p, per_layer=args.per_layer)
    if len(plans) > 1:
        t = Table(title=f"plan summary ({cfg.form})")
        for col in ("config", "ranks", "expert params", "of original", "active MACs", "expert GB"):
            t.add_column(col, no_wrap=True)
        for c, p in plans:
            ranks = sorted({pr["rank"] for L in p["layers"] for pr in L["projections"].values()})
            name = Path(c).stem if Path(c).suffix == ".json" and Path(c).stem != "config" else Path(c).resolve().parent.name
            t.add_row(name, ",".join(map(str, ranks)), f"{p['total_params_compressed']:,}",
                      f"{100 * p['total_compression_ratio']:.1f}%", f"{100 * p['active_macs_ratio']:.1f}%",
                      f"{p['total_memory_compressed_gb']:.2f}")
        Console().print(t)
    return 0
