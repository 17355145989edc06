"""Speed benchmark (issue 9): moecore ``CompressedExperts`` forward (delta and
wrapper) against the original transformers experts module with ``experts_implementation``
``"grouped_mm"`` and ``"eager"``, at real layer shapes and decode / prefill token counts,
on CPU (wall clock) or CUDA (CUDA events, bfloat16 by default).

Protocol (all recorded in the JSON):
- one MoE layer's experts module per shape; RANDOM weights (speed does not depend on the
  values; the original module is loaded with the delta module's materialized weights, so
  the run also checks that delta and grouped_mm agree);
- router-like routing: logits ~ N(0, 1) per (token, expert), softmax, top-k, renormalised
  (Mixtral style), fixed seed per token count; the same routing feeds every implementation;
- rank s of the delta form (and r = s/2 of the wrapper, same parameter count) solved by
  :func:`moecore.maths.budget.solve_uniform` for ``--target-ratio`` of the expert params;
- per case: ``--warmup`` untimed calls, then the median of up to ``--repeats`` timed calls
  (fewer, but at least 3, when one call is slow: ``--max-seconds``); wall clock on CPU,
  CUDA events (after a synchronize) on CUDA;
- every time is also given as a ratio to grouped_mm measured in the same run; the limits
  are the multiply-add ratio (budget maths) and the ratio of weight bytes touched by the
  actual routing (real tensor sizes x experts hit);
- CUDA only (not runnable without a GPU): for each T, one delta / wrapper call under
  ``torch.cuda.set_sync_debug_mode("error")`` (host-sync check), and for decode T = 1..8 a
  ``torch.cuda.CUDAGraph`` capture of each form, its replay checked equal to the eager call
  and timed.

Usage: python benchmarks/speed.py [--quick] [--device cpu|cuda] [--shapes qwen3-30b-a3b ...]
       [--tokens 1 8 64 512 4096] [--max-tokens SHAPE=T ...] [--dtype float32|bfloat16]
       [--threads N] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics as st
import sys
import time
from pathlib import Path

import torch

import moecore
from moecore.compressed_experts import PROJECTIONS, CompressedExperts
from moecore.families import layout_of
from moecore.maths import budget

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import provenance  # noqa: E402

# name -> (config class, hidden H, expert intermediate F, experts E, top-k)
SHAPES = {
    "qwen3-30b-a3b": ("qwen3_moe", 2048, 768, 128, 8),
    "mixtral-8x7b": ("mixtral", 4096, 14336, 8, 2),
    # routed experts only (the shared expert left out); same fused layout and experts forward
    "deepseek-v3": ("qwen3_moe", 7168, 2048, 256, 8),
    "tiny": ("qwen3_moe", 64, 48, 8, 2),  # --quick / tests only
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
RESULTS = Path(__file__).resolve().parent / "results"


def original_experts(family: str, h: int, f: int, e: int, k: int, dtype: torch.dtype, device: str = "cpu"):
    """The transformers experts module of ``family`` at these shapes (uninitialized, on ``device``)."""
    if family == "mixtral":
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts as cls

        cfg = MixtralConfig(hidden_size=h, intermediate_size=f, num_local_experts=e, num_experts_per_tok=k)
    else:
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts as cls

        cfg = Qwen3MoeConfig(hidden_size=h, moe_intermediate_size=f, num_experts=e, num_experts_per_tok=k)
    with torch.device("meta"):
        mod = cls(cfg)
    return mod.to(dtype).to_empty(device=device).eval(), cfg


def random_compressed(orig, form: str, rank: int, gen: torch.Generator, dtype: torch.dtype) -> CompressedExperts:
    """A ``CompressedExperts`` of the original's shapes with random core and factors
    (scaled so activations stay O(1): no denormals, no overflow)."""
    e, h, f = orig.num_experts, orig.hidden_dim, orig.intermediate_dim
    m = CompressedExperts(e, h, f, form, {p: rank for p in PROJECTIONS}, layout_of("experts", orig),
                          act_fn=orig.act_fn, dtype=dtype, device=gen.device)
    with torch.no_grad():
        for name, p in m.named_parameters():
            fan_in = p.shape[-1] if name.startswith("core_") else p.shape[-2]
            p.copy_(torch.randn(p.shape, generator=gen, device=gen.device) / fan_in ** 0.5
                    * (1.0 if name.startswith("core_") else 0.3))
    return m.eval()


def routing(t: int, e: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Router-like top-k: softmax of N(0,1) logits, top-k, renormalised. ``(T,k)`` each."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(t, e, generator=g), dim=-1)
    w, idx = torch.topk(probs, k, dim=-1)
    return idx, w / w.sum(-1, keepdim=True)


def nbytes(module) -> int:
    """Bytes of the module's stored parameters (real tensors)."""
    return sum(p.numel() * p.element_size() for p in module.parameters())


def touched_bytes(module, idx: torch.Tensor) -> int:
    """Weight bytes one forward must read for this routing: the hit experts' slices of every
    per-expert tensor (leading dim E) plus every shared tensor (the cores) in full."""
    e = module.num_experts
    hit = int(torch.unique(idx).numel())
    total = 0
    for p in module.parameters():
        per = p.numel() * p.element_size()
        total += per * hit // e if (p.dim() == 3 and p.shape[0] == e) else per
    return total


def _elapsed_ms(fn, cuda: bool) -> float:
    """Milliseconds of one ``fn()``: CUDA events on CUDA (the queue drained first), else wall clock."""
    if cuda:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


@torch.inference_mode()
def time_call(fn, warmup: int, repeats: int, max_seconds: float, cuda: bool = False) -> tuple[float, list[float]]:
    """Median milliseconds of ``fn()`` after ``warmup`` calls (one if a call takes over
    ``max_seconds / 3``); stops early (but after at least 3 timed calls) once
    ``max_seconds`` of timed calls have elapsed."""
    for _ in range(warmup):
        if _elapsed_ms(fn, cuda) > max_seconds * 1e3 / 3:
            break  # one slow warm-up call is enough
    times: list[float] = []
    while len(times) < repeats:
        times.append(_elapsed_ms(fn, cuda))
        if len(times) >= 3 and sum(times) / 1e3 > max_seconds:
            break
    return st.median(times), times


@torch.inference_mode()
def host_sync_free(fn) -> bool | str:
    """CUDA: ``True`` if ``fn()`` runs with no host synchronization, else the error text."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return True
    except RuntimeError as err:
        return str(err).splitlines()[0][:200]
    finally:
        torch.cuda.set_sync_debug_mode("default")


@torch.inference_mode()
def graph_check(fn, args, warmup: int, repeats: int) -> dict:
    """CUDA: capture ``fn(*args)`` in a CUDA graph (after warm-up on a side stream, as the
    torch docs require), replay it, compare with the eager output and time the replay."""
    eager = fn(*args)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn(*args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            static = fn(*args)
    except RuntimeError as err:
        return {"captured": False, "error": str(err).splitlines()[0][:200]}
    graph.replay()
    torch.cuda.synchronize()
    med, _ = time_call(graph.replay, warmup, repeats, 10.0, cuda=True)
    return {"captured": True, "equal_to_eager": bool(torch.equal(static, eager)), "replay_ms": med}


def bench_shape(name: str, args, dtype: torch.dtype) -> dict:
    """All implementations x token counts at one shape; returns the JSON block."""
    family, h, f, e, k = SHAPES[name]
    dev, cuda = args.device, args.device == "cuda"
    gen = torch.Generator(device=dev).manual_seed(args.seed)
    orig, cfg = original_experts(family, h, f, e, k, dtype, dev)
    shapes = [budget.ProjectionShape(p, e, *((h, f) if p == "down" else (f, h))) for p in PROJECTIONS]
    # each form's own largest uniform rank within the budget (wrapper r ~ s/2: same params)
    s = budget.solve_uniform("delta", shapes, args.target_ratio)["gate"]
    r = budget.solve_uniform("wrapper", shapes, args.target_ratio)["gate"]
    mods = {"delta": random_compressed(orig, "delta", s, gen, dtype),
            "wrapper": random_compressed(orig, "wrapper", r, gen, dtype)}
    with torch.no_grad():  # the original holds the delta's dense weights (random, speed-neutral);
        views = layout_of("experts", orig).split(orig)  # one projection at a time keeps peak memory low
        for p in PROJECTIONS:
            views[p].copy_(mods["delta"].expert_weights(p))
    orig_macs = budget.original_macs_per_token(shapes, k)
    info = {
        "family_module": type(orig).__name__, "H": h, "F": f, "E": e, "top_k": k, "delta_rank_s": s,
        "wrapper_rank_r": r, "bytes_original": nbytes(orig),
        "param_ratio": {fm: sum(p.numel() for p in m.parameters()) / sum(p.numel() for p in orig.parameters())
                        for fm, m in mods.items()},
        "macs_per_token_original": orig_macs,
        "macs_ratio": {fm: m.active_macs_per_token(k) / orig_macs for fm, m in mods.items()},
    }
    impls = {
        "grouped_mm": lambda x, i, w: _with_impl(orig, cfg, "grouped_mm", x, i, w),
        "eager": lambda x, i, w: _with_impl(orig, cfg, "eager", x, i, w),
        "delta": mods["delta"], "wrapper": mods["wrapper"],
    }
    rows = []
    for t in [t for t in args.tokens if t <= args.max_tokens.get(name, t)]:
        idx, w = routing(t, e, k, args.seed + t)
        x = torch.randn(t, h, generator=gen, device=dev).to(dtype)
        idx, w = idx.to(dev), w.to(dtype).to(dev)
        row = {"tokens": t, "experts_hit": int(torch.unique(idx).numel()), "ms": {}, "repeats": {}}
        for impl, fn in impls.items():
            if impl == "eager" and t > args.eager_max_tokens:
                continue
            med, times = time_call(lambda: fn(x, idx, w), args.warmup, args.repeats, args.max_seconds, cuda)
            row["ms"][impl], row["repeats"][impl] = med, len(times)
            print(f"  {name} T={t:5d} {impl:10s} {med:10.3f} ms  ({len(times)} runs)", flush=True)
        base = row["ms"]["grouped_mm"]
        row["speedup_vs_grouped_mm"] = {i: base / v for i, v in row["ms"].items()}
        tb = touched_bytes(orig, idx)
        row["bytes_touched_ratio"] = {fm: touched_bytes(m, idx) / tb for fm, m in mods.items()}
        row["speedup_limit_macs"] = {fm: 1 / v for fm, v in info["macs_ratio"].items()}
        row["speedup_limit_bytes"] = {fm: 1 / v for fm, v in row["bytes_touched_ratio"].items()}
        with torch.inference_mode():
            ref = impls["grouped_mm"](x, idx, w).float()
            got = mods["delta"](x, idx, w).float()
        row["delta_vs_grouped_mm_max_rel_err"] = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
        if cuda:
            row["host_sync_free"] = {fm: host_sync_free(lambda: m(x, idx, w)) for fm, m in mods.items()}
            if t <= 8:  # decode: CUDA-graph capture and replay
                row["cuda_graph"] = {fm: graph_check(m, (x, idx, w), args.warmup, args.repeats) for fm, m in mods.items()}
                print(f"  {name} T={t:5d} cuda graph {row['cuda_graph']}", flush=True)
        rows.append(row)
    del orig, mods
    return {"shape": info, "rows": rows}


def _with_impl(orig, cfg, impl: str, x, idx, w):
    """Run the transformers experts module with ``config._experts_implementation = impl``."""
    cfg._experts_implementation = impl
    return orig(x, idx, w)


def table(results: dict) -> str:
    """Markdown table: ms per implementation, ratio to grouped_mm and the two limits."""
    lines = ["| shape | T | grouped_mm ms | eager ms | delta ms | wrapper ms | eager / delta / wrapper speed-up vs grouped_mm "
             "| MAC limit d / w | bytes-touched limit d / w |", "|---|---|---|---|---|---|---|---|---|"]
    for name, blk in results.items():
        for r in blk["rows"]:
            ms, sp = r["ms"], r["speedup_vs_grouped_mm"]
            lm, lb = r["speedup_limit_macs"], r["speedup_limit_bytes"]
            lines.append(
                f"| {name} | {r['tokens']} | {ms['grouped_mm']:.2f} | {ms.get('eager', float('nan')):.2f} | "
                f"{ms['delta']:.2f} | {ms['wrapper']:.2f} | {sp.get('eager', float('nan')):.2f}x / "
                f"{sp['delta']:.2f}x / {sp['wrapper']:.2f}x | {lm['delta']:.2f}x / {lm['wrapper']:.2f}x | "
                f"{lb['delta']:.2f}x / {lb['wrapper']:.2f}x |")
    return "\n".join(lines)


def cuda_table(results: dict) -> str:
    """CUDA checks: host-sync-free call and (decode) CUDA-graph capture / replay per form."""
    lines = ["| shape | T | host-sync free d / w | graph captured, replay == eager, replay ms: delta | wrapper |",
             "|---|---|---|---|---|"]
    for name, blk in results.items():
        for r in blk["rows"]:
            g = r.get("cuda_graph", {})
            cell = [f"{v['captured']}, {v.get('equal_to_eager')}, {v.get('replay_ms', float('nan')):.3f}" if v else "-"
                    for v in (g.get("delta"), g.get("wrapper"))]
            sync = r["host_sync_free"]
            lines.append(f"| {name} | {r['tokens']} | {sync['delta']} / {sync['wrapper']} | {cell[0]} | {cell[1]} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """Speed-up vs grouped_mm against token count, one panel per shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4), squeeze=False)
    for ax, (name, blk) in zip(axes[0], results.items()):
        ts = [r["tokens"] for r in blk["rows"]]
        for impl, marker in (("delta", "o"), ("wrapper", "s"), ("eager", "^")):
            pts = [(r["tokens"], r["speedup_vs_grouped_mm"][impl]) for r in blk["rows"] if impl in r["ms"]]
            if pts:
                ax.plot(*zip(*pts), marker=marker, label=impl)
        ax.axhline(1.0, color="k", lw=1, ls="--", label="grouped_mm")
        ax.axhline(1 / blk["shape"]["macs_ratio"]["delta"], color="C0", lw=1, ls=":", label="delta MAC limit")
        ax.set(xscale="log", xticks=ts, xticklabels=[str(t) for t in ts], xlabel="tokens",
               ylabel="speed-up vs grouped_mm (same run)", title=f"{name} (s={blk['shape']['delta_rank_s']})")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--shapes", nargs="+", default=None, choices=sorted(SHAPES),
                    help="default: qwen3-30b-a3b mixtral-8x7b (+ deepseek-v3 on cuda)")
    ap.add_argument("--tokens", nargs="+", type=int, default=[1, 8, 64, 512, 4096])
    ap.add_argument("--max-tokens", nargs="*", default=[], metavar="SHAPE=T",
                    help="skip token counts above T for SHAPE (e.g. mixtral-8x7b=512 on CPU)")
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: float32 on cpu, bfloat16 on cuda")
    ap.add_argument("--target-ratio", type=float, default=0.25, help="fraction of expert params (solves s)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--max-seconds", type=float, default=20.0, help="per case; >= 3 timed runs regardless")
    ap.add_argument("--eager-max-tokens", type=int, default=1 << 30, help="skip eager above this T")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny shape, T in {1, 8, 64}, 3 repeats (smoke test)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    if args.quick:
        args.shapes, args.tokens, args.warmup, args.repeats = ["tiny"], [1, 8, 64], 1, 3
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    args.shapes = args.shapes or ["qwen3-30b-a3b", "mixtral-8x7b"] + (["deepseek-v3"] if cuda else [])
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.max_tokens = {k: int(v) for k, v in (item.split("=") for item in args.max_tokens)}
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    results = {}
    for name in args.shapes:
        print(f"{name}: {SHAPES[name][1:]} (H, F, E, k), {args.dtype}, {torch.get_num_threads()} threads", flush=True)
        results[name] = bench_shape(name, args, dtype)
    import transformers

    from transformers.integrations import moe as tf_moe

    probe = (torch.zeros(4, 8, dtype=dtype, device=args.device), torch.zeros(2, 8, 8, dtype=dtype, device=args.device),
             torch.tensor([2, 4], dtype=torch.int32, device=args.device))
    meta = {
        "grouped_mm_kernel": "torch.nn.functional.grouped_mm" if tf_moe._can_use_grouped_mm(*probe)
                             else "transformers grouped_mm fallback (per-expert loop)",
        "what": "one MoE layer's experts forward; random weights; router-like random top-k routing",
        "device": args.device, "gpu": torch.cuda.get_device_name() if cuda else None,
        "timer": "CUDA events after torch.cuda.synchronize()" if cuda else "time.perf_counter wall clock",
        "dtype": args.dtype, "threads": torch.get_num_threads(), "target_ratio": args.target_ratio,
        "warmup": args.warmup, "max_repeats": args.repeats, "max_seconds_per_case": args.max_seconds,
        "statistic": "median ms", "seed": args.seed, "tokens": args.tokens, "max_tokens": args.max_tokens,
        "quick": args.quick,
        "routing": "softmax(N(0,1) logits) -> top-k -> renormalise; seed = seed + T",
        "limits": "macs: moecore.maths.budget active/original multiply-adds per token; bytes: real tensor bytes of "
                  "shared tensors + hit experts' slices, for the actual routing",
        "versions": {"moecore": moecore.__version__, "torch": torch.__version__, "cuda": torch.version.cuda,
                     "transformers": transformers.__version__, "python": platform.python_version()},
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "peak_cuda_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "argv": sys.argv},
        "provenance": provenance(config=vars(args)),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "speed_quick" if args.quick else f"speed_{args.device}" if cuda else "speed"
    md = table(results) + (("\n\n" + cuda_table(results)) if cuda else "")
    print(md)
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    (out / f"{stem}.md").write_text(md + "\n")
    plot(results, out / f"{stem}.png")
    print(f"wrote {out / (stem + '.json')}, .md, .png")
    return {"meta": meta, "results": results}


if __name__ == "__main__":
    main()
