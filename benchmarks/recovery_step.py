"""What one step of in-engine recovery costs at a real layer shape (issue 17, point 1).

Block recovery (``moecore.block_recovery``) trains a compressed experts module by Adam on
routed calibration rows.  At Qwen3-30B-A3B's shape a layer's 200 steps took 4.9x its whole fit
on a CPU (benchmarks/RESULTS.md §7c).  This times steady-state steps of the same training on a
random module of a real shape (speed does not depend on the values), in four variants, the
first being the code as it was before the change and each adding one change:

- ``before``: the ragged form's compact factors trained through its forward's gather (a
  padded copy built, and its gradient scattered back, every step), Adam's per-tensor loop,
  glibc serving every block of 32 MiB or more from a fresh ``mmap``;
- ``heap``: every allocation from glibc's heap (``heap.reusable_heap``: no ``mmap``);
- ``padded``: the ragged form trained as the delta form on padded factors (``training_copy``);
- ``fused`` (today's code): torch's fused Adam.

Protocol: one random ragged ``CompressedExperts`` at the shape, ranks of ``ragged_cost.py``
(mean ``s`` for 25% of the expert parameters, the largest at 2·s), 4,096 calibration tokens
routed top-k, targets from a random original module; ``_fit`` with ``--batch-tokens`` rows per
step, cores trained too (the default).  Seconds per step = (time of ``--steps`` steps − time
of 2 steps) / (``--steps`` − 2), so set-up and Adam's first-step state are excluded.  Peak RSS
is not per variant (one process).  CPU wall clock.

    python benchmarks/recovery_step.py --shape qwen3-30b-a3b --steps 8 --out benchmarks/results/recovery-step-qwen3.json
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import time
from pathlib import Path

import torch

from moecore import block_recovery as br
from moecore.compressed_experts import PROJECTIONS
from moecore.heap import reusable_heap
from moecore.families import layout_of
from moecore.maths import budget

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import provenance  # noqa: E402
from ragged_cost import ragged_ranks  # noqa: E402
from speed import SHAPES, original_experts, random_compressed, routing  # noqa: E402

VARIANTS = ("before", "heap", "padded", "fused")


def timed_fit(module, layout, x, idx, w, y, variant: str, steps: int, batch: int) -> float:
    """Seconds of ``steps`` Adam steps of ``variant`` on a fresh copy of ``module``."""
    params = br.trainable(module, True)
    sizes = br.step_sizes([p for _, p in params], 0.02)
    if variant in ("padded", "fused"):
        work, names = module.training_copy(torch.float32)
        names = [names[n] for n, _ in params]
    else:
        work, names = copy.deepcopy(module), [n for n, _ in params]
    heap = contextlib.nullcontext() if variant == "before" else reusable_heap()
    with heap:
        t0 = time.perf_counter()
        br._fit(work, names, sizes, br.block_loss(layout, work, x, idx, w, y), x.shape[0], x.device, steps=steps,
                batch_tokens=batch, generator=torch.Generator().manual_seed(0), where=variant, fused=variant == "fused")
        return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=list(SHAPES), default="qwen3-30b-a3b", help="tiny: tests only")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-tokens", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    if a.steps <= 2:
        raise SystemExit("--steps must be above 2")
    family, h, f, e, k = SHAPES[a.shape]
    gen = torch.Generator().manual_seed(0)
    orig, _ = original_experts(family, h, f, e, k, torch.float32)
    with torch.no_grad():
        for p in orig.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    shapes = [budget.ProjectionShape(p, e, *((h, f) if p == "down" else (f, h))) for p in PROJECTIONS]
    s = budget.solve_uniform("delta", shapes, 0.25)["gate"]
    module = random_compressed(orig, "ragged", s, gen, torch.float32)
    ranks = ragged_ranks(e, s, 2.0)
    with torch.no_grad():
        for p in PROJECTIONS:
            getattr(module, f"ragged_r_{p}").copy_(ranks)
    layout = layout_of("experts", orig)
    x = torch.randn(a.tokens, h, generator=gen)
    idx, w = routing(a.tokens, e, k, 1)
    y = br.block_targets(orig, layout, x, idx, w)
    del orig
    out = {"shape": a.shape, "H": h, "F": f, "E": e, "top_k": k, "mean_rank": s, "max_rank": int(ranks.max()),
           "batch_tokens": a.batch_tokens, "steps": a.steps, "threads": torch.get_num_threads(),
           "provenance": provenance(), "rows": []}
    for v in a.variants:
        short, long = (timed_fit(module, layout, x, idx, w, y, v, n, a.batch_tokens) for n in (2, a.steps))
        row = {"variant": v, "s_per_step": (long - short) / (a.steps - 2), "first_2_steps_s": short}
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
    base = out["rows"][0]["s_per_step"]
    for row in out["rows"]:
        row["vs_first"] = base / row["s_per_step"]
        print(f"{row['variant']:>8}: {row['s_per_step']:.2f} s/step, {row['vs_first']:.2f}x the first variant")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
