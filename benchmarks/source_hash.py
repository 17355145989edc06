"""Cost of the content hash of a layer's source weights (issue 20): ``CheckpointReader.digest``
over one synthetic layer's experts at a real shape, page cache warm, best of ``--repeat``.

    python benchmarks/source_hash.py --shape qwen3-30b-a3b

Prints the seconds and GiB/s; RESULTS.md §7 records the figure."""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from moecore.checkpoint_reader import CheckpointReader

#: (E, H, F) of one routed-experts layer
SHAPES = {"qwen3-30b-a3b": (128, 2048, 768), "mixtral-8x7b": (8, 4096, 14336), "deepseek-v3": (256, 7168, 2048)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-30b-a3b")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    e, h, f = SHAPES[args.shape]
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        keys = {"model.layers.0.mlp.experts.gate_up_proj": torch.zeros(e, 2 * f, h, dtype=torch.bfloat16),
                "model.layers.0.mlp.experts.down_proj": torch.zeros(e, h, f, dtype=torch.bfloat16)}
        save_file(keys, str(d / "model.safetensors"))
        del keys
        size = os.path.getsize(d / "model.safetensors")
        reader = CheckpointReader.__new__(CheckpointReader)  # the digest needs only the file map
        reader.dir, reader._headers = d, {}
        reader.files = {k: d / "model.safetensors" for k in ("model.layers.0.mlp.experts.gate_up_proj",
                                                             "model.layers.0.mlp.experts.down_proj")}
        reader.digest(list(reader.files))  # warm the page cache
        times = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            reader.digest(list(reader.files))
            times.append(time.perf_counter() - t)
    best = min(times)
    print(f"{args.shape}: one layer's experts, bf16, {size / 2**20:,.0f} MiB: digest {best:.3f} s, "
          f"{size / best / 2**30:.2f} GiB/s (page cache warm, best of {args.repeat}, torch threads "
          f"{torch.get_num_threads()})")


if __name__ == "__main__":
    main()
