"""``moecore stats DIR``: the statistics table of a (compressed) model directory."""
from __future__ import annotations

import json
from pathlib import Path

from moecore.errors import CheckpointError
from moecore.planning import recount
from moecore.stats import STATS_FILENAME, print_table, read_statistics_yaml


def run(args) -> int:
    d = Path(args.model_dir)
    if not d.is_dir():
        raise CheckpointError(f"model directory not found: {d}")
    f = d / STATS_FILENAME
    if f.is_file() and not args.recompute:
        stats = read_statistics_yaml(f)
    else:  # counted from the config and the tensor headers on the meta device: no weights, any size
        stats = recount(d)
    if args.json:
        print(json.dumps(stats, indent=2, default=str))
    else:
        print_table(stats, per_layer=args.per_layer)
    return 0
