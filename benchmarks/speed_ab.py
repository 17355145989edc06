"""A/B of the ``CompressedExperts`` forward against an older version of
``src/moecore/compressed_experts.py`` (e.g. ``git show 98aef90:src/moecore/compressed_experts.py``),
same module weights, same input, in one process; the two are timed alternately (3 rounds of
3 calls each after a warm-up) so that load from other processes hits both alike.  Prints the
min and median ms of each and their ratio (old / new by min), plus the max output difference.

``--rebuilds N`` repeats that on N freshly built module pairs, constructed new-first and
old-first in turn.  On the shared VM of RESULTS §6 the speed of one large tensor depends on
where it was allocated: the same 224 MiB core read by the same GEMM took 75-90 ms in one
allocation and 95-240 ms in another, and the module built first in a round got the slow one
again and again.  One pair per process therefore measures allocation luck as much as code.
Each line then also gives the thread CPU time (``time.thread_time``: time this process was
descheduled is left out) and the paired ratio (geometric mean of old / new call by call).

Usage: python benchmarks/speed_ab.py OLD.py [--shape qwen3-30b-a3b|mixtral-8x7b] [--tokens 1 8 64]
       [--forms delta wrapper] [--threads 1] [--rebuilds 1]
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import math
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


def timings(fn, rounds: int = 3, calls: int = 3) -> list[tuple[float, float]]:
    return [_ms(fn) for _ in range(rounds * calls)]


def _ms(fn) -> tuple[float, float]:
    """``(wall ms, this thread's CPU ms)`` of one call."""
    t0, c0 = time.perf_counter(), time.thread_time()
    fn()
    return (time.perf_counter() - t0) * 1e3, (time.thread_time() - c0) * 1e3


@torch.inference_mode()
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old")
    ap.add_argument("--shape", default="qwen3-30b-a3b", choices=sorted(SHAPES))
    ap.add_argument("--tokens", nargs="+", type=int, default=[1, 8, 64, 512])
    ap.add_argument("--forms", nargs="+", default=["delta", "wrapper"])
    ap.add_argument("--target-ratio", type=float, default=0.25)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rebuilds", type=int, default=1,
                    help="fresh module pairs per token count, built new-first / old-first in turn")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    old = load_old(args.old)
    family, h, f, e, k = SHAPES[args.shape]
    with torch.device("meta"):
        orig, _ = original_experts(family, h, f, e, k, torch.float32, "meta")
    shapes = [budget.ProjectionShape(p, e, *((h, f) if p == "down" else (f, h))) for p in new.PROJECTIONS]
    gen = torch.Generator().manual_seed(0)
    layout = layout_of("experts", orig)
    for form in args.forms:
        rank = budget.solve_uniform(form, shapes, args.target_ratio)["gate"]
        m = random_compressed(orig, form, rank, gen, torch.float32)
        ranks, state = m.ranks, m.state_dict()
        build = {"new": lambda: new.CompressedExperts(e, h, f, form, ranks, layout, act_fn=orig.act_fn),
                 "old": lambda: old.CompressedExperts(e, h, f, form, ranks, layout, act_fn=orig.act_fn)}
        for t in args.tokens:
            idx, w = routing(t, e, k, t)
            x = torch.randn(t, h, generator=gen)
            a, b, err = [], [], 0.0
            for r in range(args.rebuilds):
                mods = {}
                for name in (("new", "old") if r % 2 == 0 else ("old", "new")):
                    mods[name] = build[name]().eval()
                    mods[name].load_state_dict(state)
                mn, mo = mods["new"], mods["old"]
                mn(x, idx, w), mo(x, idx, w)  # warm-up (builds the new module's operand cache)
                for _ in range(3):  # alternate so that outside load hits both alike
                    a += timings(lambda: mn(x, idx, w), 1)
                    b += timings(lambda: mo(x, idx, w), 1)
                err = max(err, float((mn(x, idx, w) - mo(x, idx, w)).abs().max()))
                del mods, mn, mo
                gc.collect()
            (aw, ac), (bw, bc) = zip(*a), zip(*b)
            paired = math.exp(st.mean(math.log(o / n) for o, n in zip(bc, ac)))
            print(f"{args.shape} {form} T={t}: new min/median {min(aw):.1f}/{st.median(aw):.1f} ms, old "
                  f"{min(bw):.1f}/{st.median(bw):.1f} ms, old/new (min) {min(bw) / min(aw):.2f}x; CPU time new "
                  f"{min(ac):.1f}/{st.median(ac):.1f} ms, old {min(bc):.1f}/{st.median(bc):.1f} ms, old/new (min) "
                  f"{min(bc) / min(ac):.2f}x, paired {paired:.2f}x; max |diff| {err:.1e}", flush=True)
        del m, state


if __name__ == "__main__":
    main()
