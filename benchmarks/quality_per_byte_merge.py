"""Merge two ``quality_per_byte.py`` runs of the same protocol into one table, Pareto plot and
"which method wins at which bytes" list (RESULTS §5).

The runs must agree on the protocol and on every model's original perplexity (checked: the
same bf16 model, documents and windows give the same number to the last digit), so their
rows are one experiment.  Rows measured in both runs are taken from the newer one.

Usage: python benchmarks/quality_per_byte_merge.py OLD.json NEW.json [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_per_byte import markdown, pareto, plot  # noqa: E402

BANDS = [(0.0, 0.10), (0.10, 0.143), (0.143, 0.20), (0.20, 0.30), (0.30, 0.55)]


def merge(old: dict, new: dict) -> list[dict]:
    """Rows of both runs, one per (model, method, level); ConfigError-free rows only."""
    keys = ("seq_len", "stride", "heldout_documents", "max_tokens")
    for k in keys:
        if old["meta"]["protocol"].get(k) != new["meta"]["protocol"].get(k):
            raise SystemExit(f"protocols differ in {k}: {old['meta']['protocol'].get(k)} vs {new['meta']['protocol'].get(k)}")
    orig = {r["model"]: r["ppl"] for r in old["rows"] if r["method"] == "original"}
    for r in new["rows"]:
        if r["method"] == "original" and r["model"] in orig and abs(orig[r["model"]] - r["ppl"]) > 1e-6 * r["ppl"]:
            raise SystemExit(f"{r['model']}: original ppl differs between runs ({orig[r['model']]} vs {r['ppl']})")
    rows: dict[tuple, dict] = {}
    for run, tag in ((old, "old"), (new, "new")):
        for r in run["rows"]:
            if "skipped" not in r:
                rows[(r["model"], r["method"], str(r["level"]))] = {**r, "run": tag}
    order = list(dict.fromkeys(r["model"] for r in old["rows"] + new["rows"]))
    return sorted(rows.values(), key=lambda r: (order.index(r["model"]), r["method"] != "original", r["expert_bytes"]))


def winners(rows: list[dict]) -> str:
    """Per model and byte band: the lowest-perplexity row whose bytes fall in the band."""
    out = ["| model | expert bytes (share of bf16) | best method (level) | held-out PPL | PPL / original | best RTN/HQQ in band |",
           "|---|---|---|---|---|---|"]
    for m in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == m and r["method"] != "original"]
        for lo, hi in BANDS:
            band = [r for r in mine if lo < r["expert_bytes_ratio"] <= hi]
            if not band:
                continue
            best = min(band, key=lambda r: r["ppl"])
            quant = [r for r in band if r["method"].startswith(("rtn-", "hqq-"))]
            bq = min(quant, key=lambda r: r["ppl"]) if quant else None
            out.append(f"| {m} | ({lo:.1%}, {hi:.1%}] | {best['method']} ({best['level']}, {best['expert_bytes_ratio']:.1%}) | "
                       f"{best['ppl']:.3f} | {best['ppl_ratio']:.4f} | "
                       + (f"{bq['method']} ({bq['expert_bytes_ratio']:.1%}): {bq['ppl']:.3f}" if bq else "none") + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    old, new = (json.loads(Path(p).read_text()) for p in (args.old, args.new))
    rows = merge(old, new)
    out = Path(args.out)
    front = {m: [(r["method"], r["level"]) for r in pareto([x for x in rows if x["model"] == m])]
             for m in dict.fromkeys(r["model"] for r in rows)}
    text = markdown(rows) + "\n\nWinners by byte band:\n\n" + winners(rows) + "\n\nPareto front:\n\n" + "\n".join(
        f"- {m}: " + ", ".join(f"{a} ({b})" for a, b in f) for m, f in front.items()) + "\n"
    (out / "quality_per_byte_merged.md").write_text(text)
    (out / "quality_per_byte_merged.json").write_text(json.dumps(
        {"meta": {"old": old["meta"], "new": new["meta"]}, "rows": rows}, indent=1, default=float))
    plot(rows, out / "quality_per_byte_merged.png")
    print(text)


if __name__ == "__main__":
    main()
