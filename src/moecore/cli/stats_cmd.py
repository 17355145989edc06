"""``moecore stats DIR``: the statistics table of a (compressed) model directory."""
from __future__ import annotations

import json
from pathlib import Path

from moecore.errors import CheckpointError
from moecore.modeling import load_model
from moecore.stats import STATS_FILENAME, print_table, read_statistics_yaml, statistics


def run(args) -> int:
    d = Path(args.model_dir)
    if not d.is_dir():
        raise CheckpointError(f"model directory not found: {d}")
    f = d / STATS_FILENAME
    if f.is_file() and not args.recompute:
        stats = read_statistics_yaml(f)
    else:
        model, _ = load_model(d, dtype="auto", need_tokenizer=False)
        stats = statistics(model)
    if args.json:
        print(json.dumps(stats, indent=2, default=str))
    else:
        print_table(stats, per_layer=args.per_layer)
    return 0
