"""Print the markdown tables of benchmarks/RESULTS.md from the measured JSON files, so the
numbers in RESULTS.md (and the README, which quotes it) are never typed by hand.

Usage: python benchmarks/render_tables.py [cards|demo|recovery ...]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ["tiny-mixtral", "tiny-qwen3moe"]


def cards() -> str:
    out = ["| model | params (total / experts) | bf16 bytes (total / experts) | held-out PPL | tokens scored | "
           "unigram PPL | expert cosine per layer | rel. residual ‖W−C‖/‖W‖ per layer | max load / uniform per layer |",
           "|---|---|---|---|---|---|---|---|---|"]
    for name in BUNDLED:
        m = json.loads((ROOT / "models" / name / "model_card.json").read_text())
        p = m["heldout_perplexity"]
        out.append(
            f"| {name} | {m['params_total']:,} / {m['params_experts']:,} | {m['bytes_total']:,} / {m['bytes_experts']:,} "
            f"| {p['ppl']:.3f} | {p['tokens_scored']:,} | {m['unigram_baseline_perplexity']:.1f} "
            f"| {' '.join(f'{c:.2f}' for c in m['expert_cosine_per_layer'])} "
            f"| {' '.join(format(r['rel_residual'], '.2f') for r in m['residual_per_layer'])} "
            f"| {' '.join(f'{x:.2f}' for x in m['router_load_max_over_uniform'])} |")
    return "\n".join(out)


DEMO_FILES = [ROOT / "benchmarks" / "demo_results.json"]  # `make demo`


def demo(paths: list[Path] = DEMO_FILES) -> str:
    rows, seen = [], set()
    for path in paths:
        for r in json.loads(path.read_text())["rows"] if path.exists() else []:
            key = (r["model"], r["form"], r["target_ratio"], r.get("init"), r.get("refine_steps"))
            if key not in seen:
                seen.add(key)
                rows.append(r)
    rows.sort(key=lambda r: (r["model"], r["form"] != "original", r["form"], -r["target_ratio"]))
    out = ["| model | form | target | expert params kept | expert bytes (bf16) | active MACs / token | "
           "expert MACs vs original | held-out PPL | Δ PPL |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        form = r["form"]
        out.append(f"| {r['model']} | {form} | {r['target_ratio']:g} | {r['expert_param_ratio']:.1%} "
                   f"| {r['bytes_experts']:,} | {r['active_macs_per_token']:,} | {r['expert_macs_ratio']:.1%} "
                   f"| {r['ppl']:.3f} | {r['ppl_change_percent']:+.2f}% |")
    return "\n".join(out)


def ablation() -> str:
    """Plain truncated SVD without calibration (the D²-MoE-like init), same evaluation as the demo."""
    return demo([ROOT / "benchmarks" / "results" / "ablation-plain-svd" / "demo_results.json"])


def init_ablation() -> str:
    """benchmarks/init_ablation.py: one ingredient of the activation-aware init at a time."""
    d = json.loads((ROOT / "benchmarks" / "results" / "init_ablation.json").read_text())
    names = list(dict.fromkeys(r["model"] for r in d["rows"]))
    by = {(r["model"], r["variant"]): r for r in d["rows"]}
    out = ["| variant (delta form, target %g) | " % d["meta"]["target_ratio"] + " | ".join(names) + " |",
           "|---|" + "---|" * len(names)]
    for v in dict.fromkeys(r["variant"] for r in d["rows"]):
        cells = [f"{by[(n, v)]['ppl']:.3f} ({by[(n, v)]['ppl_change_percent']:+.2f}%)" if (n, v) in by else "—"
                 for n in names]
        out.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(out) + f"\n\nCommand: `{d['meta']['command']}`"


def recovery() -> str:
    out = ["| model | stage | held-out PPL | Δ vs original | stage wall time (s) | stage CPU time (s) |", "|---|---|---|---|---|---|"]
    cmds = []
    for name in BUNDLED:
        f = ROOT / "benchmarks" / "results" / f"recovery-{name}.json"
        if not f.exists():
            continue
        d = json.loads(f.read_text())
        cmds.append(d["meta"]["command"])
        for r in d["rows"]:
            out.append(f"| {name} | {r['stage']} | {r['ppl']:.3f} | {r['ppl_change_percent']:+.2f}% | {r['stage_seconds']} | {r['stage_cpu_seconds']} |")
    return "\n".join(out) + "\n\nCommands:\n" + "\n".join(f"    {c}" for c in cmds)


def engine_recovery() -> str:
    """RESULTS §3f: in-engine recovery steps against held-out PPL and compress CPU time, one
    ``scripts/demo.py`` run per cell (benchmarks/results/engine-recovery/MODEL-stepsN[-core])."""
    base = ROOT / "benchmarks" / "results" / "engine-recovery"
    rows = [r for f in sorted(base.glob("*/demo_results.json")) for r in json.loads(f.read_text())["rows"][1:]]
    out = ["| model | recovery steps / layer | trains | held-out PPL | Δ PPL | compress CPU s | × zero-shot CPU |",
           "|---|---|---|---|---|---|---|"]
    for name in BUNDLED:
        mine = sorted((r for r in rows if r["model"] == name),
                      key=lambda r: (r["recover_steps"], bool(r.get("recover_train_core"))))
        zero = next(r["compress_cpu_seconds"] for r in mine if r["recover_steps"] == 0)
        for r in mine:
            what = "—" if not r["recover_steps"] else "factors + cores" if r["recover_train_core"] else "factors"
            out.append(f"| {name} | {r['recover_steps']} | {what} | {r['ppl']:.3f} | {r['ppl_change_percent']:+.2f}% "
                       f"| {r['compress_cpu_seconds']:.1f} | {r['compress_cpu_seconds'] / zero:.2f} |")
    return "\n".join(out)


if __name__ == "__main__":
    for what in sys.argv[1:] or ["cards", "demo", "ablation", "init_ablation", "recovery", "engine_recovery"]:
        print(globals()[what]())
        print()
