"""What the ragged form's per-expert ranks cost in the forward (issue 17, point 2).

The grouped GEMMs take one inner dimension for all groups, so the ragged form's operands are
padded to the largest expert rank of each projection (``moecore/forms/ragged.py``).  At a
real layer shape, with random weights (speed does not depend on the values) and the same
stored parameters, this times one experts forward of

- ``delta``: every expert at the mean rank ``s`` (what the delta form stores);
- ``ragged``: per-expert ranks averaging ``s`` with the largest at ``cap · s`` (the rank
  pattern measured on tiny-qwen3moe layer 1, down projection, tiled over the experts and
  rescaled, so that ``expert_rank_cap`` is reached: padding cost depends only on the largest);

and reports, beside each, the stored bytes and the bytes of the cached grouped-GEMM operands.
Routing, timing and shapes are ``benchmarks/speed.py``'s (router-like top-k, median of
repeated calls after warm-up, wall clock on CPU).

    python benchmarks/ragged_cost.py --shape qwen3-30b-a3b --tokens 1 8 64 512
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from moecore.compressed_experts import PROJECTIONS
from moecore.maths import budget

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import provenance  # noqa: E402
from speed import SHAPES, original_experts, random_compressed, routing, time_call  # noqa: E402

#: tiny-qwen3moe layer 1, down projection, ragged ranks at 25% (mean 15, cap 2): the measured pattern
PATTERN = [30, 14, 24, 9, 19, 30, 15, 7, 30, 14, 0, 5, 1, 30, 29, 12, 0, 2, 10, 30, 5, 7, 10, 30, 0, 30, 12, 2,
           0, 18, 25, 30]


def ragged_ranks(e: int, s: int, cap: float) -> torch.Tensor:
    """``(E,)`` ranks summing to ``E·s``, none above ``cap·s``, shaped like :data:`PATTERN`."""
    base = torch.tensor(PATTERN * -(-e // len(PATTERN)), dtype=torch.float64)[:e]
    r = (base / base.mean() * s).clamp(max=int(cap * s)).floor().long()
    i = 0
    while int(r.sum()) < e * s:  # top up below the cap, one unit at a time
        if r[i % e] < int(cap * s):
            r[i % e] += 1
        i += 1
    return r


def operand_bytes(m) -> int:
    with torch.no_grad():
        return sum(t.numel() * t.element_size() for t in m._operands().values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=[k for k in SHAPES if k != "tiny"], default="qwen3-30b-a3b")
    ap.add_argument("--tokens", nargs="+", type=int, default=[1, 8, 64, 512])
    ap.add_argument("--target-ratio", type=float, default=0.25)
    ap.add_argument("--cap", type=float, default=2.0, help="expert_rank_cap (the largest rank / the mean)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--max-seconds", type=float, default=10.0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    family, h, f, e, k = SHAPES[args.shape]
    dtype = torch.float32
    gen = torch.Generator().manual_seed(0)
    orig, _ = original_experts(family, h, f, e, k, dtype)
    shapes = [budget.ProjectionShape(p, e, *((h, f) if p == "down" else (f, h))) for p in PROJECTIONS]
    s = budget.solve_uniform("delta", shapes, args.target_ratio)["gate"]
    ranks = ragged_ranks(e, s, args.cap)
    mods = {"delta": random_compressed(orig, "delta", s, gen, dtype),
            "ragged": random_compressed(orig, "ragged", s, gen, dtype)}
    del orig
    with torch.no_grad():
        for p in PROJECTIONS:
            getattr(mods["ragged"], f"ragged_r_{p}").copy_(ranks)
    out = {"shape": args.shape, "H": h, "F": f, "E": e, "top_k": k, "mean_rank": s, "max_rank": int(ranks.max()),
           "cap": args.cap, "dtype": str(dtype), "threads": torch.get_num_threads(), "provenance": provenance(),
           "stored_bytes": {n: sum(t.numel() * t.element_size() for t in m.state_dict().values()) for n, m in mods.items()},
           "operand_bytes": {n: operand_bytes(m) for n, m in mods.items()}, "rows": []}
    for t in args.tokens:
        idx, w = routing(t, e, k, seed=t)
        x = torch.randn(t, h, generator=torch.Generator().manual_seed(t))
        row = {"tokens": t}
        for name, m in mods.items():
            row[f"{name}_ms"], _ = time_call(lambda m=m: m(x, idx, w), 2, args.repeats, args.max_seconds)
        row["ragged_over_delta"] = row["ragged_ms"] / row["delta_ms"]
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
    print(json.dumps({k2: out[k2] for k2 in ("mean_rank", "max_rank", "stored_bytes", "operand_bytes")}))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
