"""Quality per byte: held-out perplexity against stored expert bytes, for
moecore and baselines at equal byte budgets, side by side in one process run.

Methods (each on a fresh copy of the model, weights first rounded through bfloat16, the
stored dtype; evaluated in float32 under the pinned perplexity protocol):
- ``original``: the bf16-rounded model (the baseline every ratio is taken against);
- ``moecore-ragged`` (the default form) / ``moecore-delta`` / ``moecore-wrapper``: ``moecore.compress`` with
  ``target_ratio = budget`` and activation-aware (whitened) init on the calibration split;
- ``delta-svd``: delta form, mean core, plain truncated SVD, no calibration (D²-MoE-like);
- ``mobe``: MoBE (arXiv 2508.05257, the authors' ``train.py``: Adam on the plain weight error,
  one basis per 4 experts) on all three projections, ``k`` from the budget;
- ``mobe-paper``: the same with down_proj kept dense, as the paper does (possible only at a
  budget above 1/3; below it the row is recorded as skipped);
- ``reap-prune``: REAP-like expert pruning to ``floor(budget·E)`` experts per layer;
- ``hc-merge``: HC-SMoE-like frequency-weighted merging into ``floor(budget·E)`` clusters;
- ``rtn-{4,3,2}bit``: round-to-nearest asymmetric group quantization (group 64);
- ``hqq-{4,3,2,1}bit``: HQQ through the ``hqq`` library (group 64, float16 scale and zero);
- ``moecore-q``: moecore-delta with quantized storage (``CompressionConfig.quant``), level
  ``"RATIO:CORE/FACTOR"`` (e.g. ``0.5:4/4``): parameter ratio, core bits, factor bits
  (group 64, HQQ); the factors are refit after the core is quantized.

Expert bytes count stored tensors at bf16 (2 bytes/param; moecore: ``statistics`` params of
the real tensors); RTN: b-bit codes + a bf16 scale and a b-bit zero point per group; HQQ and
moecore-q: the stored packed codes, scales and zero points (``moecore.statistics`` bytes).
Calibration reads only the ``calib`` split, evaluation only ``heldout``.  Outputs (under
``--out``): ``quality_per_byte.{json,md,png}`` and ``quality_per_byte.rows.jsonl`` (one line
per finished row, written as the run goes, so an interrupted run keeps what it measured).

Usage: python benchmarks/quality_per_byte.py [--models tiny-mixtral tiny-qwen3moe | DIR ...]
       [--budgets 0.5 0.25 0.15] [--bits 4 3 2] [--max-tokens N] [--calib-tokens 32768]
       [--methods ...] [--quick] [--out DIR]
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import torch

import moecore
from moecore.config import QuantConfig
from moecore.data import load_split, spread_sequences
from moecore.errors import ConfigError
from moecore.evaluation import PPL_PROTOCOL, perplexity, token_stream

sys.path.insert(0, str(Path(__file__).resolve().parent))
import baselines as bl  # noqa: E402
from provenance import provenance, set_overrides  # noqa: E402

REPO = Path(__file__).resolve().parents[1]  # the source checkout (bundled models, results)

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ["moecore-ragged", "moecore-delta", "moecore-wrapper", "mobe", "mobe-paper", "delta-svd", "reap-prune",
           "hc-merge", "rtn", "hqq", "moecore-q"]
QUANT_SETTINGS = ["0.5:8/8", "0.5:4/4", "0.5:4/3", "0.5:4/2", "0.25:8/8", "0.25:4/4", "0.25:4/3", "0.15:4/4"]
STORED = torch.bfloat16


def tiny_random_model(seed: int = 0):
    """A tiny random Qwen3-MoE (8 experts, top-2) with the bundled tokenizer (no download)."""
    from transformers import AutoTokenizer, Qwen3MoeConfig, Qwen3MoeForCausalLM

    tok = AutoTokenizer.from_pretrained(REPO / "data" / "tokenizer")
    cfg = Qwen3MoeConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         num_experts=8, num_experts_per_tok=2, max_position_embeddings=512, norm_topk_prob=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    return Qwen3MoeForCausalLM(cfg).eval(), tok


def load(name: str):
    """``(model, tokenizer, label)``: ``"tiny-random"``, a bundled model name or a directory."""
    if name == "tiny-random":
        model, tok = tiny_random_model()
    else:
        from moecore.modeling import load_model

        path = Path(name) if Path(name).is_dir() else REPO / "models" / name
        model, tok = load_model(path)
    return model.to(STORED).to(torch.float32).eval(), tok, Path(name).name


def calib_sequences(tok, max_tokens: int, seq_len: int) -> list[torch.Tensor]:
    """Calibration split -> one token stream cut into ``seq_len`` sequences spread evenly over
    it, at most ``max_tokens`` (same recipe as ``moecore.compress``)."""
    return spread_sequences(token_stream(tok, load_split("calib")), max_tokens, seq_len)


def expert_params_original(model) -> int:
    """Original expert parameters (real tensors of the fused experts modules)."""
    return sum(p.numel() for _, m, _ in bl.experts_of(model) for p in m.parameters())


def config_overrides(args) -> dict:
    """``--set KEY=VALUE`` items as CompressionConfig keyword arguments (JSON values where they parse)."""
    return set_overrides(getattr(args, "set", None))


def apply(method: str, level: float, base, tok, calib_texts, stats, args) -> dict:
    """Apply one method at one level (budget fraction, or bits for ``rtn``) to a copy of
    ``base``; returns ``{"model", "expert_bytes", ...extra}``."""
    model = copy.deepcopy(base)
    extra: dict = {}
    if method == "moecore-q":
        ratio, bits = str(level).split(":")
        core_bits, factor_bits = (int(b) for b in bits.split("/"))
        quant = QuantConfig(core_bits=core_bits, factor_bits=factor_bits, group_size=args.group, method="hqq")
        # the delta form (its factors refit to the quantized core): what RESULTS §5 recorded
        cfg = moecore.CompressionConfig(target_ratio=float(ratio), calib_max_tokens=args.calib_tokens,
                                        calib_seq_len=args.calib_seq_len, refine_steps=args.refine_steps, quant=quant,
                                        **{"form": "delta", **config_overrides(args)})
        moecore.compress(model, cfg, calibration=calib_texts, tokenizer=tok)
        model.to(STORED)  # bytes as stored: codes and scales are integers, float leftovers bf16
        st = moecore.statistics(model)["experts"]
        model.to(torch.float32)
        return {"model": model, "expert_bytes": st["bytes_compressed"], "params_ratio": st["compression_ratio"],
                "expert_macs_ratio": st["macs_ratio"], "quant": dataclasses.asdict(quant), "config": cfg.to_dict()}
    if method.startswith("moecore") or method == "delta-svd":
        svd = method == "delta-svd"
        form = "delta" if svd else method.removeprefix("moecore-")
        cfg = moecore.CompressionConfig(form=form, target_ratio=level, init="svd" if svd else "auto",
                                        calib_max_tokens=args.calib_tokens, calib_seq_len=args.calib_seq_len,
                                        refine_steps=0 if svd else args.refine_steps, **config_overrides(args))
        moecore.compress(model, cfg, calibration=None if svd else calib_texts, tokenizer=tok)
        model.to(STORED)  # bytes as stored (a ragged form's int32 ranks included), evaluated from bf16 values
        st = moecore.statistics(model)["experts"]
        model.to(torch.float32)
        extra = {"ranks": sorted({r for m in model.modules() if hasattr(m, "ranks") for r in m.ranks.values()}),
                 "expert_macs_ratio": st["macs_compressed"] / st["macs_original"], "config": cfg.to_dict()}
        return {"model": model, "expert_bytes": st["bytes_compressed"], **extra}
    if method in ("mobe", "mobe-paper"):
        nbytes, info = bl.mobe_compress(model, level, gate_up_only=method == "mobe-paper", steps=args.mobe_steps)
        fits = [f for per in info.values() for f in per.values()]
        extra = {"mobe_steps": args.mobe_steps, "mobe_k": sorted({f["k"] for f in fits}),
                 "mobe_bases": sorted({f["m"] for f in fits}),
                 "mobe_rel_err_mean": sum(f["rel_err"] for f in fits) / len(fits)}
    elif method == "reap-prune":
        nbytes, kept = bl.prune_experts(model, stats, level)
        extra = {"kept_per_layer": {p: len(v) for p, v in kept.items()}, "kept_ids": kept}
    elif method == "hc-merge":
        nbytes, labels = bl.merge_experts(model, stats, level)
        extra = {"clusters_per_layer": {p: len(set(v)) for p, v in labels.items()}, "cluster_labels": labels}
    elif method == "rtn":
        nbytes, backend = bl.rtn_quantize(model, int(level), args.group)
        extra = {"bits": int(level), "group": args.group, "backend": backend}
    elif method == "hqq":
        nbytes, backend = bl.hqq_quantize(model, int(level), args.group)
        extra = {"bits": int(level), "group": args.group, "backend": backend}
    else:
        raise ValueError(method)
    return {"model": model, "expert_bytes": nbytes, **extra}


def run_model(name: str, args, log: Path | None = None, commit: dict | None = None) -> list[dict]:
    """Every method x level on one model; rows with ppl, bytes and ratios to the original.
    Each finished row is also appended to ``log`` (JSONL, with ``commit``: the code's commit
    and dirty flag) so an interrupted run keeps them and what produced them."""
    base, tok, label = load(name)
    stream = token_stream(tok, load_split("heldout")[::args.doc_stride])
    calib_texts = load_split("calib")
    orig_bytes = expert_params_original(base) * bl.BF16_BYTES
    ev = dict(stream=stream, max_tokens=args.max_tokens, progress=False, seq_len=args.seq_len, stride=args.stride)
    t0 = time.time()
    res = perplexity(base, tok, **ev)
    rows = [{"model": label, "method": "original", "level": 1.0, "expert_bytes": orig_bytes, "ppl": res.ppl,
             "nll": res.nll, "tokens_scored": res.tokens_scored, "seconds": round(time.time() - t0, 2)}]
    print(f"{label}: original ppl {res.ppl:.4f} ({res.tokens_scored} tokens, {rows[0]['seconds']} s)", flush=True)
    stats = None
    if {"reap-prune", "hc-merge"} & set(args.methods):
        t0 = time.time()
        stats = bl.collect_expert_stats(base, calib_sequences(tok, args.calib_tokens, args.calib_seq_len),
                                        mean_tokens=args.merge_tokens, seed=args.seed)
        print(f"{label}: expert statistics on calibration in {time.time() - t0:.1f} s", flush=True)
    for method in args.methods:
        levels = {"rtn": args.bits, "hqq": args.hqq_bits, "moecore-q": args.quant_settings}.get(method, args.budgets)
        for level in levels:
            t0 = time.time()
            torch.manual_seed(args.seed)
            name_ = f"{method}-{int(level)}bit" if method in ("rtn", "hqq") else method
            try:
                out = apply(method, level, base, tok, calib_texts, stats, args)
            except ConfigError as exc:  # e.g. a budget below the cores' own share: recorded, not fatal
                rows.append({"model": label, "method": name_, "level": level, "skipped": str(exc)})
                print(f"{label}: {name_:16s} level {level:<5} skipped: {exc}", flush=True)
                continue
            model = out.pop("model")
            t1 = time.time()
            res = perplexity(model, tok, **ev)
            row = {"model": label, "method": name_, "level": level, **out, "ppl": res.ppl, "nll": res.nll,
                   "tokens_scored": res.tokens_scored, "apply_seconds": round(t1 - t0, 2),
                   "eval_seconds": round(time.time() - t1, 2)}
            rows.append(row)
            if log is not None:
                with log.open("a") as fh:
                    fh.write(json.dumps({**row, "ppl_ratio": row["ppl"] / rows[0]["ppl"], "commit": commit},
                                        default=float) + "\n")
            print(f"{label}: {name_:16s} level {level:<5} bytes {row['expert_bytes'] / orig_bytes:6.1%} "
                  f"ppl {res.ppl:.4f} ({row['apply_seconds']} + {row['eval_seconds']} s)", flush=True)
            del model
    for r in rows:
        if "skipped" in r:
            continue
        r["expert_bytes_ratio"] = r["expert_bytes"] / orig_bytes
        r["ppl_ratio"] = r["ppl"] / rows[0]["ppl"]
    return rows


def markdown(rows: list[dict]) -> str:
    """One table: model, method, level, expert bytes (share of bf16), ppl, ppl ratio."""
    out = ["| model | method | level | expert bytes | share of bf16 | held-out PPL | PPL / original |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            out.append(f"| {r['model']} | {r['method']} | {r['level']} | skipped: {r['skipped'][:60]}… | | | |")
            continue
        out.append(f"| {r['model']} | {r['method']} | {r['level']} | {r['expert_bytes']:,} | "
                   f"{r['expert_bytes_ratio']:.1%} | {r['ppl']:.4f} | {r['ppl_ratio']:.4f} |")
    return "\n".join(out)


def pareto(rows: list[dict]) -> list[dict]:
    """The rows no other row beats on both bytes and perplexity (one model), by bytes."""
    pts = sorted((r for r in rows if r["method"] != "original"), key=lambda r: (r["expert_bytes"], r["ppl"]))
    front, best = [], float("inf")
    for r in pts:
        if r["ppl"] < best:
            front.append(r)
            best = r["ppl"]
    return front


def plot(rows: list[dict], path: Path) -> None:
    """PPL vs expert-byte share, one line per method, one panel per model (log y); the
    Pareto front of all methods drawn through the non-dominated points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 5), squeeze=False)
    fam = lambda r: r["method"].split("-")[0] if r["method"].startswith(("rtn-", "hqq-")) else r["method"]  # noqa: E731
    for ax, m in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == m]
        for meth in dict.fromkeys(fam(r) for r in mine if r["method"] != "original"):
            pts = sorted((r["expert_bytes_ratio"], r["ppl"]) for r in mine if fam(r) == meth)
            label = {"rtn": "RTN 4/3/2-bit g64", "hqq": "HQQ 4/3/2/1-bit g64",
                     "moecore-q": "moecore-delta + quantized core/factors"}.get(meth, meth)
            style = {"ls": "none", "marker": "*", "ms": 9} if meth == "moecore-q" else {"marker": "o"}
            colors = ["moecore-q", "hqq", "reap-prune", "hc-merge", "moecore-wrapper", "rtn", "moecore-delta", "delta-svd",
                      "moecore-ragged", "mobe", "mobe-paper"]
            ax.plot(*zip(*pts), label=label, color=f"C{colors.index(meth)}" if meth in colors else None, **style)
        for r in mine:
            if r["method"] == "moecore-q":
                ax.annotate(str(r["level"]), (r["expert_bytes_ratio"], r["ppl"]), fontsize=6,
                            xytext=(3, 3), textcoords="offset points")
        front = pareto(mine)
        ax.plot([r["expert_bytes_ratio"] for r in front], [r["ppl"] for r in front], color="k", lw=2, alpha=0.3,
                label="Pareto front (all methods)")
        ax.axhline(mine[0]["ppl"], color="k", ls="--", lw=1, label="original (bf16)")
        ax.set(title=m, xlabel="expert bytes / bf16 expert bytes", ylabel="held-out perplexity", yscale="log",
               xscale="log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["tiny-mixtral", "tiny-qwen3moe"],
                    help="bundled model names, model directories, or 'tiny-random'")
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--budgets", nargs="+", type=float, default=[0.5, 0.25, 0.15], help="fractions of bf16 expert bytes")
    ap.add_argument("--bits", nargs="+", type=int, default=[4, 3, 2], help="RTN bit widths")
    ap.add_argument("--hqq-bits", nargs="+", type=int, default=[4, 3, 2, 1])
    ap.add_argument("--quant-settings", nargs="+", default=QUANT_SETTINGS,
                    help="moecore-q levels RATIO:CORE_BITS/FACTOR_BITS")
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--doc-stride", type=int, default=6,
                    help="score every N-th held-out document (default 6, as `make demo`; 1 = the whole split)")
    ap.add_argument("--max-tokens", type=int, default=None, help="cap the held-out stream (smoke runs)")
    ap.add_argument("--seq-len", type=int, default=PPL_PROTOCOL["seq_len"])
    ap.add_argument("--stride", type=int, default=PPL_PROTOCOL["stride"])
    ap.add_argument("--calib-tokens", type=int, default=32768)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--mobe-steps", type=int, default=1000, help="Adam steps of each MoBE fit (converged by ~500 on "
                    "the bundled models; the paper runs 10k-30k on full-size layers)")
    ap.add_argument("--merge-tokens", type=int, default=4096, help="tokens per layer for HC-SMoE mean outputs")
    ap.add_argument("--refine-steps", type=int, default=moecore.CompressionConfig().refine_steps,
                    help="moecore refinement iterations (delta-svd always uses 0: the plain baseline)")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="override a CompressionConfig field of the moecore methods, e.g. --set calib_prior_tokens=0")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny random model, 2 budgets, 1k tokens (smoke test)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    if args.quick:
        if "--models" not in (argv if argv is not None else sys.argv):
            args.models = ["tiny-random"]
        args.budgets, args.max_tokens = [0.5, 0.25], args.max_tokens or 1024
        args.hqq_bits, args.quant_settings = [4, 2], ["0.5:4/4", "0.25:4/3"]
        args.calib_tokens, args.merge_tokens = min(args.calib_tokens, 1024), min(args.merge_tokens, 512)
        args.mobe_steps = min(args.mobe_steps, 50)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "quality_per_byte_quick" if args.quick else "quality_per_byte"
    log = out / f"{stem}.rows.jsonl"
    log.write_text("")
    t0 = time.time()
    prov = provenance(config={"defaults": moecore.CompressionConfig().to_dict(), "set": config_overrides(args)},
                      argv=argv)
    commit = {k: prov["git"][k] for k in ("commit", "dirty")}
    rows = [r for name in args.models for r in run_model(name, args, log, commit)]
    import transformers

    try:
        import torchao
        torchao_version = torchao.__version__
    except ImportError:
        torchao_version = None
    from importlib.metadata import version
    meta = {
        "protocol": {**PPL_PROTOCOL, "seq_len": args.seq_len, "stride": args.stride, "max_tokens": args.max_tokens,
                     "heldout_documents": f"every {args.doc_stride}-th"},
        "calibration": {"split": "calib", "max_tokens": args.calib_tokens, "seq_len": args.calib_seq_len,
                        "merge_mean_tokens_per_layer": args.merge_tokens},
        "refine_steps": args.refine_steps, "budgets": args.budgets, "bits": args.bits, "group": args.group,
        "hqq_bits": args.hqq_bits, "quant_settings": args.quant_settings,
        "seed": args.seed,
        "threads": torch.get_num_threads(), "quick": args.quick, "seconds_total": round(time.time() - t0, 1),
        "bytes": "experts only, stored tensors at bf16 (2 B/param); RTN: b-bit codes + bf16 scale + b-bit zero "
                 "per group; pruning/merging: kept experts/clusters (router and its cluster map not counted)",
        "versions": {"moecore": moecore.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "torchao": torchao_version, "hqq": version("hqq"),
                     "python": platform.python_version()},
        "argv": sys.argv if argv is None else argv,
        "provenance": prov,
    }
    md = markdown(rows)
    print(md)
    payload = {"meta": meta, "rows": rows}
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=1, default=float))
    (out / f"{stem}.md").write_text(md + "\n")
    plot([r for r in rows if "skipped" not in r], out / f"{stem}.png")
    print(f"wrote {out / (stem + '.json')}, .md, .png ({meta['seconds_total']} s)")
    return payload


if __name__ == "__main__":
    main()
