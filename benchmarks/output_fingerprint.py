"""Fingerprint what compression produces on the bundled models, to check that a refactoring
changed nothing: for each model and form, a hash of every stored tensor of the compressed
model, a hash of its logits on fixed token ids, and its statistics.

Run it under two source trees and compare the JSON files::

    git worktree add /tmp/base REV
    PYTHONPATH=/tmp/base/src python benchmarks/output_fingerprint.py base.json
    python benchmarks/output_fingerprint.py head.json
    python benchmarks/output_fingerprint.py --compare base.json head.json

Setting: delta, wrapper and ragged at target ratio 0.25, and delta and ragged with 4-bit quantized storage, 4,096
calibration tokens from the calib split, 2 refinement steps (every stage of the default path
runs, in a few minutes).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import moecore
from moecore import CompressionConfig
from moecore.data import load_split

REPO = Path(__file__).resolve().parents[1]
MODELS = ("tiny-mixtral", "tiny-qwen3moe")
# (name, form, quantized storage): both forms in float, and the delta form quantized
SETTINGS = (("delta", "delta", None), ("wrapper", "wrapper", None), ("ragged", "ragged", None),
            ("delta-q4", "delta", {"core_bits": 4, "factor_bits": 4, "group_size": 64}),
            ("ragged-q4", "ragged", {"core_bits": 4, "factor_bits": 4, "group_size": 64}))


def fingerprint() -> dict:
    ids = torch.randint(5, 4000, (2, 64), generator=torch.Generator().manual_seed(1))
    out = {"moecore_version": moecore.__version__, "source": moecore.__file__}
    for name in MODELS:
        for key, form, quant in SETTINGS:
            path = REPO / "models" / name
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(path)
            cfg = CompressionConfig(form=form, target_ratio=0.25, calib_max_tokens=4096, refine_steps=2, quant=quant)
            moecore.compress(model, cfg, calibration=load_split("calib"), tokenizer=tok)
            with torch.no_grad():
                logits = model(ids).logits.double()
            h = hashlib.sha256()
            for k, v in sorted(model.state_dict().items()):
                h.update(k.encode())
                h.update(v.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
            out[f"{name}/{key}"] = {
                "tensors_sha256": h.hexdigest(),
                "logits_sha256": hashlib.sha256(logits.numpy().tobytes()).hexdigest(),
                "logits_sum": float(logits.sum()), "logits_abs_sum": float(logits.abs().sum()),
                "statistics": json.loads(json.dumps(moecore.statistics(model), default=str)),
            }
            print(name, key, out[f"{name}/{key}"]["tensors_sha256"][:16], flush=True)
    return out


def compare(a: dict, b: dict) -> bool:
    same = True
    for key in (k for k in a if "/" in k):
        x, y = a[key], b[key]
        tensors = x["tensors_sha256"] == y["tensors_sha256"]
        logits = x["logits_sha256"] == y["logits_sha256"]
        stats = x["statistics"] == y["statistics"]
        rel = abs(x["logits_sum"] - y["logits_sum"]) / x["logits_abs_sum"]
        print(f"{key}: tensors {'identical' if tensors else 'DIFFER'}, statistics {'identical' if stats else 'DIFFER'}, "
              f"logits {'identical' if logits else f'differ (|Δ sum| / Σ|logit| = {rel:.1e})'}")
        same &= tensors and stats
    return same


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", help="JSON to write")
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"))
    args = ap.parse_args(argv)
    if args.compare:
        a, b = (json.loads(Path(p).read_text()) for p in args.compare)
        return 0 if compare(a, b) else 1
    Path(args.out).write_text(json.dumps(fingerprint(), indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
