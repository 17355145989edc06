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


def demo() -> str:
    d = json.loads((ROOT / "benchmarks" / "demo_results.json").read_text())
    out = ["| model | form | target | expert params kept | expert bytes (bf16) | active MACs / token | "
           "expert MACs vs original | held-out PPL | Δ PPL |", "|---|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        out.append(f"| {r['model']} | {r['form']} | {r['target_ratio']:g} | {r['expert_param_ratio']:.1%} "
                   f"| {r['bytes_experts']:,} | {r['active_macs_per_token']:,} | {r['expert_macs_ratio']:.1%} "
                   f"| {r['ppl']:.3f} | {r['ppl_change_percent']:+.2f}% |")
    return "\n".join(out)


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


if __name__ == "__main__":
    for what in sys.argv[1:] or ["cards", "demo", "recovery"]:
        print(globals()[what]())
        print()
