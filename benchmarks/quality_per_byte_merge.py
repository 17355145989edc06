"""Merge two ``quality_per_byte.py`` runs of the same protocol into one table, Pareto plot and
"which method wins at which bytes" list (RESULTS §5).

The runs must agree on the protocol and on every model's original perplexity (checked to a
relative 1e-5: the same bf16 model, documents and windows), so their rows are one
experiment.  Rows measured in several runs are taken from the latest one.  Runs are numbered
in the order given (OLD is run 1); the table's "run" column names the run each row comes
from, so RESULTS.md can say which commit and config produced it, and ``--stale N:METHOD,...``
marks run N's rows of those methods as stale (their code path changed after they were
recorded; the reason is given in RESULTS.md).

Usage: python benchmarks/quality_per_byte_merge.py OLD.json NEW.json|NEW.rows.jsonl ... [--out DIR]
       [--stale N:METHOD,METHOD ...]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_per_byte import pareto, plot  # noqa: E402

BANDS = [(0.0, 0.10), (0.10, 0.143), (0.143, 0.20), (0.20, 0.30), (0.30, 0.55)]


def _load(path: str) -> dict:
    """A run's ``{"meta", "rows"}``: its JSON, or the ``.rows.jsonl`` an interrupted run left
    (finished rows only, no meta and no original row)."""
    p = Path(path)
    if p.name.endswith(".jsonl"):
        return {"meta": None, "rows": [json.loads(line) for line in p.read_text().splitlines() if line.strip()]}
    return json.loads(p.read_text())


def merge(old: dict, news: list[dict]) -> list[dict]:
    """Rows of all runs, one per (model, method, level), later runs winning; byte and perplexity
    ratios recomputed against the OLD run's original row of each model."""
    keys = ("seq_len", "stride", "heldout_documents", "max_tokens")
    orig = {r["model"]: r for r in old["rows"] if r["method"] == "original"}
    for new in news:
        for k in keys if new["meta"] else ():
            if old["meta"]["protocol"].get(k) != new["meta"]["protocol"].get(k):
                raise SystemExit(f"protocols differ in {k}")
        for r in new["rows"]:
            if r["method"] == "original" and abs(orig[r["model"]]["ppl"] - r["ppl"]) > 1e-5 * r["ppl"]:
                raise SystemExit(f"{r['model']}: original ppl differs between runs ({orig[r['model']]['ppl']} vs {r['ppl']})")
    rows: dict[tuple, dict] = {}
    for run_no, run in enumerate([old, *news], 1):
        for r in run["rows"]:
            if "skipped" in r or (r["method"] == "original" and run_no != 1):
                continue
            o = orig[r["model"]]
            rows[(r["model"], r["method"], str(r["level"]))] = {
                **r, "run": run_no, "expert_bytes_ratio": r["expert_bytes"] / o["expert_bytes"],
                "ppl_ratio": r["ppl"] / o["ppl"]}
    order = list(orig)
    return sorted(rows.values(), key=lambda r: (order.index(r["model"]), r["method"] != "original", r["expert_bytes"]))


def mark_stale(rows: list[dict], specs: list[str]) -> None:
    """``specs`` like ``"1:moecore-delta,delta-svd"``: set ``stale`` on those methods' rows of that run."""
    for spec in specs:
        run, _, methods = spec.partition(":")
        for r in rows:
            if r["run"] == int(run) and r["method"] in methods.split(","):
                r["stale"] = True


def table(rows: list[dict]) -> str:
    """The merged rows with the run each comes from ("stale" when marked)."""
    out = ["| model | method | level | expert bytes | share of bf16 | held-out PPL | PPL / original | run |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        run = f"{r['run']}" + (" (stale)" if r.get("stale") else "")
        out.append(f"| {r['model']} | {r['method']} | {r['level']} | {r['expert_bytes']:,} | "
                   f"{r['expert_bytes_ratio']:.1%} | {r['ppl']:.4f} | {r['ppl_ratio']:.4f} | {run} |")
    return "\n".join(out)


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
            stale = " (stale)" if best.get("stale") else ""
            out.append(f"| {m} | ({lo:.1%}, {hi:.1%}] | {best['method']} ({best['level']}, {best['expert_bytes_ratio']:.1%}){stale} | "
                       f"{best['ppl']:.3f} | {best['ppl_ratio']:.4f} | "
                       + (f"{bq['method']} ({bq['expert_bytes_ratio']:.1%}): {bq['ppl']:.3f}" if bq else "none") + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old")
    ap.add_argument("new", nargs="+")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--stale", nargs="*", default=[], metavar="N:METHOD,...",
                    help="mark run N's rows of these methods stale (code path changed since they were recorded)")
    args = ap.parse_args(argv)
    rows = merge(_load(args.old), [_load(p) for p in args.new])
    mark_stale(rows, args.stale)
    out = Path(args.out)
    front = {m: [(r["method"], f"{r['level']}" + (", stale" if r.get("stale") else ""))
                 for r in pareto([x for x in rows if x["model"] == m])]
             for m in dict.fromkeys(r["model"] for r in rows)}
    text = table(rows) + "\n\nWinners by byte band:\n\n" + winners(rows) + "\n\nPareto front:\n\n" + "\n".join(
        f"- {m}: " + ", ".join(f"{a} ({b})" for a, b in f) for m, f in front.items()) + "\n"
    runs = "\n".join(f"- run {i}: {p}" for i, p in enumerate([args.old, *args.new], 1))
    text += "\nRuns:\n\n" + runs + "\n"
    (out / "quality_per_byte_merged.md").write_text(text)
    (out / "quality_per_byte_merged.json").write_text(json.dumps(
        {"meta": {"runs": [args.old, *args.new], "stale": args.stale}, "rows": rows}, indent=1, default=float))
    plot(rows, out / "quality_per_byte_merged.png")
    print(text)


if __name__ == "__main__":
    main()
