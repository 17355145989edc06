"""Which parts of the activation-aware init matter: one ingredient added at a time.

Delta form at one target ratio (default 0.25) on the bundled models; every variant is cast
to bfloat16 (the stored dtype) and scored in float32 on the demo's held-out documents
(every 6th) under the pinned protocol. Variants, in order:

1. ``plain``: mean core + truncated SVD, no calibration (D²-MoE-like), no refinement;
2. ``plain+refine``: the same plus 10 weight-space core/factor refinement steps;
3. ``whitened, head calib``: per-expert whitening with the first 32k calibration tokens
   (moecore's old behaviour: the calib split is stored in source order, so this is 72% KJV);
4. ``whitened``: the same tokens budget spread evenly over the whole calibration split;
5. ``+ routing weights``: Grams weighted by squared routing weights;
6. ``+ frequency core``: core starts from the router-frequency-weighted mean;
7. ``+ refinement`` (= the default config): 10 joint core/factor steps;
8. ``output core``: the default with the output-error-optimal core start instead;
9. ``without whitening``: the default with ``init="svd"``: calibration still sets the
   frequency core, but factors and refinement work in weight space (isolates whitening).

Usage: python benchmarks/init_ablation.py [--models tiny-mixtral tiny-qwen3moe] [--ratio 0.25]
Writes benchmarks/results/init_ablation.json.
"""
from __future__ import annotations

from pathlib import Path
import argparse
import json
import sys
import time

import torch
import transformers

import moecore
from moecore.data import load_split, token_stream
from moecore.evaluation import PPL_PROTOCOL, perplexity
from moecore.io_utils import atomic_write_text
from moecore.modeling import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import provenance  # noqa: E402

REPO = Path(__file__).resolve().parents[1]  # the source checkout (bundled models, results)

BASE = {"init": "whitened", "core": "mean", "calib_weighting": "tokens", "refine_steps": 0}
VARIANTS = [  # (label, config overrides, calibration: None | "head" | "all")
    ("plain SVD, mean core (no calibration)", {"init": "svd", "core": "mean", "refine_steps": 0}, None),
    ("plain SVD + 10 refinement steps (no calibration)", {"init": "svd", "core": "mean"}, None),
    ("whitened, head of calib split (old)", BASE, "head"),
    ("whitened, calib spread over the split", BASE, "all"),
    ("+ routing-weighted Grams", {**BASE, "calib_weighting": "routing"}, "all"),
    ("+ frequency core", {**BASE, "calib_weighting": "routing", "core": "frequency"}, "all"),
    ("+ 10 refinement steps (= default)", {}, "all"),
    ("default with output-optimal core", {"core": "output"}, "all"),
    ("default without whitening (calibration for core and weights only)", {"init": "svd"}, "all"),
]


def head_texts(tok, texts: list[str], budget: int) -> list[str]:
    """The leading documents holding the first ``budget`` tokens (the old head truncation)."""
    out, n = [], 0
    for t in texts:
        if n >= budget:
            break
        out.append(t)
        n += len(tok(t, add_special_tokens=False, verbose=False)["input_ids"]) + 1
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["tiny-mixtral", "tiny-qwen3moe"])
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--doc-stride", type=int, default=6)
    ap.add_argument("--only", nargs="+", type=int, default=None,
                    help="run only these variant numbers (1-based) and merge them into the existing JSON")
    args = ap.parse_args()
    out = REPO / "benchmarks" / "results" / "init_ablation.json"
    rows = json.loads(out.read_text())["rows"] if args.only and out.exists() else []
    variants = [v for i, v in enumerate(VARIANTS, 1) if not args.only or i in args.only]
    meta = {"form": "delta", "target_ratio": args.ratio, "protocol": PPL_PROTOCOL,
            "heldout_documents": f"every {args.doc_stride}-th", "stored_dtype": "bfloat16",
            "calib_max_tokens": moecore.CompressionConfig().calib_max_tokens,
            "versions": {"moecore": moecore.__version__, "torch": torch.__version__,
                         "transformers": transformers.__version__},
            "command": f"python benchmarks/init_ablation.py --models {' '.join(args.models)} --ratio {args.ratio}",
            "provenance": provenance(config={"defaults": moecore.CompressionConfig().to_dict(),
                                             "variants": [[v[0], v[1], v[2]] for v in variants]})}
    for name in args.models:
        path = REPO / "models" / name
        model, tok = load_model(path)
        stream = token_stream(tok, load_split("heldout")[::args.doc_stride])
        calib = load_split("calib")
        base = perplexity(model, tok, stream=stream, progress=False).ppl
        rows = [r for r in rows if not (r["model"] == name and r["variant"] in ("original", *(v[0] for v in variants)))]
        rows.append({"model": name, "variant": "original", "ppl": base, "ppl_change_percent": 0.0})
        for label, over, cal in variants:
            m, _ = load_model(path)
            texts = None if cal is None else head_texts(tok, calib, 32768) if cal == "head" else calib
            t0 = time.time()
            # the init alone: no in-engine recovery (on by default since RESULTS §3f)
            moecore.compress(m, moecore.CompressionConfig(form="delta", target_ratio=args.ratio, **{"recover_steps": 0, **over}),
                             calibration=texts, tokenizer=tok)
            secs = time.time() - t0
            m.to(torch.bfloat16).to(torch.float32)
            ppl = perplexity(m, tok, stream=stream, progress=False).ppl
            rows.append({"model": name, "variant": label, "overrides": over, "calibration": cal, "ppl": ppl,
                         "ppl_change_percent": 100 * (ppl / base - 1), "compress_seconds": round(secs, 1)})
            print(json.dumps(rows[-1]), flush=True)
            atomic_write_text(out, json.dumps({"meta": meta, "rows": rows}, indent=1))
    order = {v[0]: i for i, v in enumerate([("original",), *VARIANTS])}
    rows.sort(key=lambda r: (args.models.index(r["model"]) if r["model"] in args.models else -1, order[r["variant"]]))
    atomic_write_text(out, json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
