"""Peak memory and time of in-engine recovery on one layer at a real shape: every expert
trained at once against a chunk of experts at a time (``recover_memory_gb``).

Block recovery trains a compressed layer's factors by Adam (``moecore.block_recovery.train_block``,
what the engine runs after each layer's fit).  All at once, the trained tensors take 24 bytes
per padded factor element: 123 GiB for a DeepSeek-V3 layer at 25%, more than any one GPU.  With
``--memory-gb`` below that, the experts are trained a chunk at a time (factors only).

Protocol: one random ragged ``CompressedExperts`` at the shape in float32, as the engine trains
it on a CPU (mean rank for 25% of the expert parameters, ranks of ``ragged_cost.py`` up to 2x
the mean), ``--tokens`` calibration rows routed top-k, float32 rows, targets from the same
module with every ``A`` factor 10% larger (learnable; the factors scaled so that the low-rank paths
carry a fifth of the output; speed and memory do not depend on the
values), every 5th 512-token sequence held out; ``train_block`` with
the product defaults (lr 0.02, 1,024 rows per step, cores trained when all experts train at
once) and ``--steps`` steps per chunk.  One configuration per process; peak anonymous memory
(``RssAnon``, sampled every 20 ms) before and during ``train_block``.  CPU wall clock.

    python benchmarks/recovery_memory.py --shape qwen3-30b-a3b --steps 20 --out benchmarks/results/recovery-memory-qwen3-whole.json
    python benchmarks/recovery_memory.py --shape qwen3-30b-a3b --steps 20 --memory-gb 1 --out ...
    python benchmarks/recovery_memory.py --shape deepseek-v3 --steps 20 --memory-gb 8 --out ...
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import torch

from moecore import block_recovery as br
from moecore import recovery_chunks as rc
from moecore.compressed_experts import PROJECTIONS
from moecore.families import layout_of
from moecore.maths import budget

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import provenance  # noqa: E402
from ragged_cost import ragged_ranks  # noqa: E402
from speed import SHAPES, original_experts, random_compressed, routing  # noqa: E402

GIB = 1 << 30


class AnonPeak:
    """The process's peak ``RssAnon`` (heap and tensors, not mapped files) since :meth:`reset`."""

    def __init__(self, every: float = 0.02):
        self.peak, self.every = 0, every
        threading.Thread(target=self._run, daemon=True).start()

    @staticmethod
    def now() -> int:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("RssAnon"))

    def reset(self) -> None:
        self.peak = self.now()

    def _run(self) -> None:
        while True:
            self.peak = max(self.peak, self.now())
            time.sleep(self.every)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=list(SHAPES), default="qwen3-30b-a3b", help="tiny: tests only")
    ap.add_argument("--steps", type=int, default=20, help="Adam steps (per chunk when chunked)")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--batch-tokens", type=int, default=1024)
    ap.add_argument("--memory-gb", type=float, default=None, help="recover_memory_gb (default: all experts at once)")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    sampler = AnonPeak()
    family, h, f, e, k = SHAPES[a.shape]
    gen = torch.Generator().manual_seed(0)
    orig, _ = original_experts(family, h, f, e, k, torch.bfloat16, device="meta")  # shapes only
    shapes = [budget.ProjectionShape(p, e, *((h, f) if p == "down" else (f, h))) for p in PROJECTIONS]
    s = budget.solve_uniform("delta", shapes, 0.25)["gate"]
    module = random_compressed(orig, "ragged", s, gen, torch.float32)  # float32: what the engine trains on a CPU
    ranks = ragged_ranks(e, s, 2.0)
    with torch.no_grad():
        for p in PROJECTIONS:
            getattr(module, f"ragged_r_{p}").copy_(ranks)
            getattr(module, f"ragged_a_{p}").mul_(10.0)  # the low-rank paths a fifth of the output, not 2%
    layout = layout_of("experts", orig)
    x = torch.randn(a.tokens, h, generator=gen)  # (T, H) float32, as the engine keeps them on a CPU
    idx, w = routing(a.tokens, e, k, 1)
    # learnable targets: the module with every A factor 10% larger, run a chunk of experts at a
    # time (the whole ragged forward pads every expert to the largest rank: 22 GB at DeepSeek-V3)
    y = torch.zeros(a.tokens, h)
    step = rc.expert_chunk(module, 1.0) or e
    for lo in range(0, e, step):
        part = rc.chunk_module(module, lo, min(e, lo + step), torch.float32)
        with torch.no_grad():
            for p in PROJECTIONS:
                part.get_parameter(f"delta_a_{p}").mul_(1.1)
        y += rc.part_output(part, lo, min(e, lo + step), x, idx, w)
        del part
    length = min(512, max(1, a.tokens // 10))  # 512-token sequences (shorter ones for a toy run)
    held = br.heldout_rows(br.sequence_ids([a.tokens], [(a.tokens // length, length)]))
    chunk = rc.expert_chunk(module, a.memory_gb)
    sampler.reset()
    base = sampler.now()
    t0 = time.perf_counter()
    rep = br.train_block(module, layout, x, idx, w, y, held, steps=a.steps, lr=0.02, batch_tokens=a.batch_tokens,
                         train_core=True, seed=0, where=a.shape, memory_gb=a.memory_gb)
    seconds = time.perf_counter() - t0
    out = {"shape": a.shape, "H": h, "F": f, "E": e, "top_k": k, "mean_rank": s, "max_rank": int(ranks.max()),
           "tokens": a.tokens, "steps": a.steps, "memory_gb": a.memory_gb, "experts_per_chunk": chunk or e,
           "module_gib": sum(t.numel() * t.element_size() for t in module.parameters()) / GIB,
           "anon_before_gib": base / GIB, "peak_anon_gib": sampler.peak / GIB,
           "training_gib": (sampler.peak - base) / GIB, "seconds": seconds,
           "report": rep, "threads": torch.get_num_threads(), "provenance": provenance()}
    print(json.dumps({k_: v for k_, v in out.items() if k_ != "provenance"}, indent=1), flush=True)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
