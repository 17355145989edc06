"""End-to-end speed (issue 9): prefill tokens/s and ``model.generate`` tokens/s (batch 1 and
16) of a 4-layer model with Qwen3-30B-A3B shapes, the original (transformers' ``grouped_mm``
experts) against the compressed model (delta form, ``--target-ratio`` of the expert
parameters).

Protocol (all recorded in the JSON):
- ``Qwen3MoeForCausalLM`` built from a config (real shapes, ``--layers`` layers, real vocab),
  RANDOM weights (N(0, 0.02)); every experts module then swapped in place for a random
  ``CompressedExperts`` (same scaling as ``benchmarks/speed.py``) for the second half;
- prefill: one forward of ``(B, --prompt-len)`` random ids with ``logits_to_keep=1``;
  tokens/s = B · prompt-len / time;
- generate: greedy ``model.generate`` of exactly ``--new-tokens`` tokens after a
  ``--gen-prompt-len`` prompt (its prefill included); tokens/s = B · new-tokens / time;
- each figure the median of ``--repeats`` timed calls after one warm-up call; CUDA:
  ``torch.cuda.synchronize()`` around a wall-clock timer (launch overhead is part of e2e).

Usage: python benchmarks/speed_e2e.py [--device cuda|cpu] [--quick] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics as st
import sys
import time
from pathlib import Path

import torch

import moecore
from moecore.compressed_experts import PROJECTIONS
from moecore.families import find_experts
from moecore.maths import budget
from moecore.surgery import replace_module

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import DTYPES, RESULTS, random_compressed  # noqa: E402
from provenance import provenance  # noqa: E402


def build(args, dtype: torch.dtype):
    """Random ``Qwen3MoeForCausalLM`` with Qwen3-30B-A3B shapes (tiny ones with ``--quick``)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    dims = dict(hidden_size=64, moe_intermediate_size=48, num_experts=8, num_experts_per_tok=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, vocab_size=512) if args.quick else \
        dict(hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
             num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=151936)
    cfg = Qwen3MoeConfig(num_hidden_layers=args.layers, max_position_embeddings=4096, **dims)
    with torch.device("meta"):
        model = Qwen3MoeForCausalLM(cfg)
    model = model.to(dtype).to_empty(device=args.device).eval()
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, device=args.device) * 0.02)
    model.config._experts_implementation = "grouped_mm"
    model.generation_config.pad_token_id = 0
    return model, cfg, gen


def compress_randomly(model, args, dtype, gen) -> int:
    """Swap every experts module for a random ``CompressedExperts`` (delta, budgeted rank s)."""
    s = None
    for path, mod, _ in find_experts(model):
        e, h, f = mod.num_experts, mod.hidden_dim, mod.intermediate_dim
        shapes = [budget.ProjectionShape(p, e, *((h, f) if p == "down" else (f, h))) for p in PROJECTIONS]
        s = budget.solve_uniform("delta", shapes, args.target_ratio)["gate"]
        replace_module(model, path, random_compressed(mod, "delta", s, gen, dtype))
    return s


def timed(fn, args) -> float:
    """Median seconds of ``fn()`` after one warm-up call."""
    fn()
    times = []
    for _ in range(args.repeats):
        if args.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if args.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return st.median(times)


@torch.inference_mode()
def measure(model, args, vocab: int) -> dict:
    """Prefill and generate tokens/s per batch size."""
    out = {}
    g = torch.Generator().manual_seed(args.seed)
    for b in args.batches:
        ids = torch.randint(1, vocab, (b, args.prompt_len), generator=g).to(args.device)
        prompt = ids[:, :args.gen_prompt_len]
        t_pre = timed(lambda: model(input_ids=ids, logits_to_keep=1, use_cache=False), args)
        t_gen = timed(lambda: model.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                             do_sample=False), args)
        out[b] = {"prefill_tok_s": b * args.prompt_len / t_pre, "generate_tok_s": b * args.new_tokens / t_gen,
                  "prefill_s": t_pre, "generate_s": t_gen}
        print(f"  batch {b:3d}: prefill {out[b]['prefill_tok_s']:10.1f} tok/s, generate {out[b]['generate_tok_s']:8.2f} tok/s",
              flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--prompt-len", type=int, default=512, help="prefill length")
    ap.add_argument("--gen-prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--target-ratio", type=float, default=0.25)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny shapes, short prompts (smoke test)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    if args.quick:
        args.prompt_len, args.gen_prompt_len, args.new_tokens, args.repeats = 32, 8, 4, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype or ("bfloat16" if args.device == "cuda" else "float32")]
    model, cfg, gen = build(args, dtype)
    print(f"original ({args.layers} layers, {dtype}, {args.device})", flush=True)
    results = {"original": measure(model, args, cfg.vocab_size)}
    s = compress_randomly(model, args, dtype, gen)
    print(f"compressed (delta, s={s})", flush=True)
    results["delta"] = measure(model, args, cfg.vocab_size)
    ratios = {str(b): {k: results["delta"][b][k] / results["original"][b][k] for k in ("prefill_tok_s", "generate_tok_s")}
              for b in args.batches}
    import transformers

    meta = {"what": "4-layer Qwen3-30B-A3B-shaped Qwen3MoeForCausalLM, random weights, original (grouped_mm experts) "
                    "vs delta-compressed experts", "device": args.device,
            "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None, "dtype": str(dtype),
            "threads": torch.get_num_threads(), "delta_rank_s": s, "args": vars(args),
            "versions": {"moecore": moecore.__version__, "torch": torch.__version__, "cuda": torch.version.cuda,
                         "transformers": transformers.__version__, "python": platform.python_version()},
            "machine": {"platform": platform.platform(), "processor": platform.processor(), "argv": sys.argv},
            "provenance": provenance(config=vars(args))}
    data = {"meta": meta, "results": results, "speedup_delta_vs_original": ratios}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"speed_e2e{'_quick' if args.quick else ''}_{args.device}.json"
    path.write_text(json.dumps(data, indent=1))
    print(json.dumps(ratios, indent=1))
    print(f"wrote {path}")
    return data


if __name__ == "__main__":
    main()
