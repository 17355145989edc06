"""A/B of the ``CompressedExperts`` forward against an older version of
``src/moecore/compressed_experts.py`` (e.g. ``git show 98aef90:src/moecore/compressed_experts.py``),
same module weights, same input, in one process; the two are timed alternately (3 rounds of
3 calls each after a warm-up) so that load from other processes hits both alike.  Prints the
min and median ms of each and their ratio (old / new by min), plus the max output difference.

Usage: python benchmarks/speed_ab.py OLD.py [--shape qwen3-30b-a3b|mixtral-8x7b] [--tokens 1 8 64]
       [--forms delta wrapper] [--threads 1]
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics as st
import sys
import time
from pathlib import Path

import torch

import moecore.compressed_experts as new
from moecore.families import layout_of

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import SHAPES, original_experts, random_compressed, routing  # noqa: E402
from moecore.maths import budget  # noqa: E402


def load_old(path: str):
    """The old module file loaded as ``moecore._old_compressed_experts`` (relative imports resolve in moecore)."""
    spec = importlib.util.spec_from_file_location("moecore._old_compressed_experts", path)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "moecore"
    spec.loader.exec_module(mod)
    return mod


def timings(fn, rounds: int = 3, calls: int = 3) -> list[float]:
    return [_ms(fn) for _ in range(rounds * calls)]


def _ms(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


@torch.inference_mode()
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old")
    ap.add_argument("--shape", default="qwen3-30b-a3b", choices=sorted(SHAPES))
    ap.add_argument("--tokens", nargs="+", type=int, default=[1, 8, 64, 512])
    ap.add_argument("--forms", nargs="+", default=["delta", "wrapper"])
    ap.add_argument("--target-ratio", type=float, default=0.25)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    old = load_old(args.old)
    family, h, f, e, k = SHAPES[args.shape]
    with torch.device("meta"):
        orig, _ = original_experts(family, h, f, e, k, torch.float32, "meta")
    shapes = [budget.ProjectionShape(p, e, *((h, f) if p == "down" else (f, h))) for p in new.PROJECTIONS]
    gen = torch.Generator().manual_seed(0)
    for form in args.forms:
        rank = budget.solve_uniform(form, shapes, args.target_ratio)["gate"]
        m = random_compressed(orig, form, rank, gen, torch.float32)
        mo = old.CompressedExperts(e, h, f, form, m.ranks, layout_of("experts", orig), act_fn=orig.act_fn)
        mo.load_state_dict(m.state_dict())
        for t in args.tokens:
            idx, w = routing(t, e, k, t)
            x = torch.randn(t, h, generator=gen)
            a, b = [], []
            m(x, idx, w), mo(x, idx, w)  # warm-up (builds the new module's operand cache)
            for _ in range(3):  # alternate so that outside load hits both alike
                a += timings(lambda: m(x, idx, w), 1)
                b += timings(lambda: mo(x, idx, w), 1)
            err = float((m(x, idx, w) - mo(x, idx, w)).abs().max())
            print(f"{args.shape} {form} T={t}: new min/median {min(a):.1f}/{st.median(a):.1f} ms, old "
                  f"{min(b):.1f}/{st.median(b):.1f} ms, old/new (min) {min(b) / min(a):.2f}x, max |diff| {err:.1e}",
                  flush=True)


if __name__ == "__main__":
    main()
