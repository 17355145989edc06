"""`make demo`: the main job on the two bundled models.

For each bundled model: parameters (total / experts), bytes and held-out perplexity of the
original; then activation-aware compression (calibration split) with every form at three
expert-parameter ratios, each cast to the stored dtype (bfloat16) and evaluated in float32
under the pinned perplexity protocol. Prints one table, writes
``benchmarks/demo_results.json`` and a ratio-vs-perplexity plot ``benchmarks/demo_ratio_vs_ppl.png``.

Usage: python scripts/demo.py [--models tiny-mixtral ...] [--ratios 0.5 0.25 0.15]
       [--forms ragged delta wrapper] [--max-tokens N (quick look; recorded results use all)]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import matplotlib
import torch
import transformers
from rich.console import Console
from rich.table import Table

import moecore
from moecore.data import load_split
from moecore.evaluation import PPL_PROTOCOL, perplexity, token_stream
from moecore.families import find_experts
from moecore.forms import FORM_NAMES
from moecore.io_utils import atomic_write_text
from moecore.modeling import load_model

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REPO = Path(__file__).resolve().parents[1]  # the source checkout (bundled models, results)
sys.path.insert(0, str(REPO / "benchmarks"))
from provenance import provenance, set_overrides  # noqa: E402

STORED = torch.bfloat16


def measure(model, tok, stream, label: dict, max_tokens) -> dict:
    """Cast to the stored dtype for byte counts, then evaluate in float32."""
    model.to(STORED)
    st = moecore.statistics(model)
    model.to(torch.float32)
    t0 = time.time()
    res = perplexity(model, tok, stream=stream, max_tokens=max_tokens)
    ex = st["experts"]
    return {**label, "params_total": st["model"]["params_compressed"], "params_experts": ex["params_compressed"],
            "expert_param_ratio": ex["params_compressed"] / ex["params_original"],
            "bytes_total": st["model"]["bytes_compressed"], "bytes_experts": ex["bytes_compressed"],
            "active_macs_per_token": st["model"]["macs_compressed"],
            "expert_macs_ratio": ex["macs_compressed"] / ex["macs_original"],
            "ppl": res.ppl, "tokens_scored": res.tokens_scored, "eval_seconds": round(time.time() - t0, 1)}


def run_model(name: str, args, console: Console, done: list[dict], save) -> list[dict]:
    path = REPO / "models" / name
    model, tok = load_model(path)
    stream = token_stream(tok, load_split("heldout")[::args.doc_stride])
    calib = load_split("calib")
    console.print(f"[bold]{name}[/]: original")
    if args.original_from:  # reuse a recorded original row measured under the same protocol
        old = json.loads(Path(args.original_from).read_text())
        rows = [r for r in old["rows"] if r["model"] == name and r["form"] == "original"][:1]
        if not rows or old["meta"]["heldout_documents"] != f"every {args.doc_stride}-th" \
                or old["meta"]["max_tokens"] != args.max_tokens:
            raise SystemExit(f"{args.original_from} has no original row for {name} under this protocol")
        rows[0] = {**rows[0], "reused_from": str(args.original_from)}
    else:
        rows = [measure(model, tok, stream, {"model": name, "form": "original", "target_ratio": 1.0}, args.max_tokens)]
    base = rows[0]["ppl"]
    rows[0]["ppl_change_percent"] = 0.0
    for form in args.forms:
        for ratio in args.ratios:
            console.print(f"[bold]{name}[/]: {form} form, target ratio {ratio}")
            m, _ = load_model(path)
            t0, c0 = time.time(), time.process_time()
            extra = {} if args.refine_steps is None else {"refine_steps": args.refine_steps}
            if args.propagate:
                extra["propagate"] = args.propagate
            extra.update(set_overrides(args.set))  # --set key=value: any CompressionConfig field (ablations)
            cfg = moecore.CompressionConfig(form=form, target_ratio=ratio, init=args.init, **extra)
            moecore.compress(m, cfg, calibration=calib if args.init == "auto" else None, tokenizer=tok)
            cpu = time.process_time() - c0  # all threads of this process: robust to a shared machine
            recovery = [{"path": p, **mod.report["recovery"]} for p, mod, _ in find_experts(m, "compressed")
                        if "recovery" in mod.report]  # per-layer block errors of in-engine recovery
            row = measure(m, tok, stream, {"model": name, "form": form, "target_ratio": ratio, "init": args.init,
                                           "refine_steps": cfg.refine_steps, "propagate": cfg.propagate,
                                           "calib_prior_tokens": cfg.calib_prior_tokens},
                          args.max_tokens)
            row["compress_seconds"] = round(time.time() - t0 - row["eval_seconds"], 1)
            row["compress_cpu_seconds"] = round(cpu, 1)
            row.update({k: getattr(cfg, k) for k in ("recover_steps", "recover_lr", "recover_batch_tokens",
                                                     "recover_train_core")})
            if recovery:
                row["recovery_layers"] = recovery
            row["ppl_change_percent"] = 100 * (row["ppl"] / base - 1)
            rows.append(row)
            save(done + rows)  # partial results survive an interrupted run
            del m
    return rows


def table(rows: list[dict]) -> Table:
    n = rows[0]["tokens_scored"]
    t = Table(title=f"moecore demo: activation-aware zero-shot compression (held-out perplexity, {n:,} tokens scored)")
    for col in ["model", "form", "params (total)", "expert params", "kept", "bytes (bf16)", "expert bytes",
                "active MACs/token", "expert MACs vs orig", "held-out PPL", "Δ PPL"]:
        t.add_column(col, justify="right" if col not in ("model", "form") else "left")
    for r in rows:
        t.add_row(r["model"], r["form"], f"{r['params_total']:,}", f"{r['params_experts']:,}",
                  f"{r['expert_param_ratio']:.1%}", f"{r['bytes_total']:,}", f"{r['bytes_experts']:,}",
                  f"{r['active_macs_per_token']:,}", f"{r['expert_macs_ratio']:.1%}", f"{r['ppl']:.3f}",
                  f"{r['ppl_change_percent']:+.2f}%")
    return t


def plot(rows: list[dict], path: Path) -> None:
    fig, axes = plt.subplots(1, len({r["model"] for r in rows}), figsize=(11, 4), squeeze=False)
    for ax, name in zip(axes[0], dict.fromkeys(r["model"] for r in rows)):
        mine = [r for r in rows if r["model"] == name]
        base = mine[0]["ppl"]
        for form, marker in zip(dict.fromkeys(r["form"] for r in mine if r["form"] != "original"), "o^sdv"):
            pts = sorted((r["expert_param_ratio"], r["ppl"]) for r in mine if r["form"] == form)
            if pts:
                ax.plot(*zip(*pts), marker=marker, label=f"{form} form")
        ax.axhline(base, color="k", ls="--", lw=1, label="original")
        ax.set(title=name, xlabel="expert parameters kept (fraction)", ylabel="held-out perplexity")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["tiny-mixtral", "tiny-qwen3moe"])
    ap.add_argument("--forms", nargs="+", default=["ragged", "delta", "wrapper"], choices=list(FORM_NAMES))
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.5, 0.25, 0.15])
    ap.add_argument("--doc-stride", type=int, default=6,
                    help="score every N-th held-out document (default 6: about 64k tokens drawn from all three "
                         "sources; 1 = the whole split, as in the model cards)")
    ap.add_argument("--max-tokens", type=int, default=None, help="truncate the stream further (smoke runs)")
    ap.add_argument("--refine-steps", type=int, default=None, help="alternating refinement iterations, both forms (default: the config's, 10)")
    ap.add_argument("--init", default="auto", choices=["auto", "svd"],
                    help="svd: plain truncated SVD without calibration (with --refine-steps 0: mean core + SVD, "
                         "the D²-MoE-like ablation)")
    ap.add_argument("--propagate", choices=["compressed", "original"], default=None,
                    help="calibrate on the original (default) or the compressed earlier layers (sequential)")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="override a CompressionConfig field, e.g. --set calib_prior_tokens=0 (repeatable)")
    ap.add_argument("--original-from", default=None,
                    help="reuse the original model's row from this demo_results.json (same protocol) instead of "
                         "evaluating it again")
    ap.add_argument("--out", default=str(REPO / "benchmarks"))
    args = ap.parse_args()
    console = Console(width=200)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"protocol": PPL_PROTOCOL, "heldout_documents": f"every {args.doc_stride}-th", "max_tokens": args.max_tokens, "calibration": "calib split",
            "init": "activation-whitened (init=auto with calibration)" if args.init == "auto" else "plain SVD, no calibration", "stored_dtype": "bfloat16",
            "config": moecore.CompressionConfig(**({} if args.refine_steps is None else {"refine_steps": args.refine_steps}),
                                                init=args.init).to_dict(),
            "versions": {"moecore": moecore.__version__, "torch": torch.__version__,
                         "transformers": transformers.__version__}, "threads": torch.get_num_threads(),
            "provenance": provenance(config={"args": vars(args)})}

    def save(rows):
        atomic_write_text(out / "demo_results.json", json.dumps({"meta": meta, "rows": rows}, indent=1))

    rows: list[dict] = []
    for name in args.models:
        rows += run_model(name, args, console, rows, save)
    save(rows)
    console.print(table(rows))
    plot(rows, out / "demo_ratio_vs_ppl.png")
    console.print(f"wrote {out / 'demo_results.json'} and {out / 'demo_ratio_vs_ppl.png'}")


if __name__ == "__main__":
    main()
