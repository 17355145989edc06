"""Issue 17: does a compression setting's gain hold on text of another kind than the bundled
corpus (Bible, Jargon File, Python docs), which its calibration never saw?

The text: the licence texts Debian ships in ``/usr/share/common-licenses`` (GPL, Apache,
MPL, ...: legal English, a register the corpus does not hold; present on every Debian or
Ubuntu machine through ``base-files``).  Each setting compresses the bundled model from the
bundled calibration split (as ``make demo`` does) and is scored on that text with the
RESULTS perplexity protocol (``moecore.evaluation.perplexity``: windows of 256, stride 128).

    python benchmarks/other_text.py --model tiny-qwen3moe --out benchmarks/results/other-text/tiny-qwen3moe.json

Settings (``--settings``, each ``NAME:key=value,key=value`` over ``CompressionConfig(target_ratio=0.25)``):
by default the zero-shot delta fit (the default before in-engine recovery), the delta default
(in-engine recovery) and the ragged form with the default recovery.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import moecore
from moecore.data import load_split
from moecore.evaluation import perplexity, token_stream

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import set_overrides  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LICENSES = Path("/usr/share/common-licenses")
DEFAULT_SETTINGS = ["delta-zero-shot:form=delta,recover_steps=0", "delta-default:form=delta",
                    "ragged-default:form=ragged"]


def licence_texts() -> list[str]:
    """Every regular file of ``/usr/share/common-licenses`` (symlinks skipped: duplicates), sorted."""
    files = sorted(p for p in LICENSES.iterdir() if p.is_file() and not p.is_symlink())
    if not files:
        raise SystemExit(f"no licence texts under {LICENSES}")
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


def parse(setting: str) -> tuple[str, dict]:
    """``NAME:key=value,key=value`` -> ``(NAME, CompressionConfig keyword arguments)``."""
    name, _, rest = setting.partition(":")
    return name, set_overrides([item for item in rest.split(",") if item])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["tiny-mixtral", "tiny-qwen3moe"], default="tiny-qwen3moe")
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    d = ROOT / "models" / args.model
    tok = AutoTokenizer.from_pretrained(d)
    texts = licence_texts()
    stream = token_stream(tok, texts)
    load = lambda: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()  # noqa: E731
    res = perplexity(load(), tok, stream=stream, progress=False)
    out = {"model": args.model, "ratio": args.ratio, "text": str(LICENSES), "documents": len(texts),
           "tokens_scored": res.tokens_scored, "torch": torch.__version__, "moecore": moecore.__version__,
           "rows": [{"setting": "original", "ppl": res.ppl}]}
    print(json.dumps(out["rows"][-1]), flush=True)
    for setting in args.settings:
        name, kw = parse(setting)
        model = load()
        t0 = time.process_time()
        moecore.compress(model, moecore.CompressionConfig(target_ratio=args.ratio, **kw),
                         calibration=load_split("calib"), tokenizer=tok, progress=False)
        cpu = time.process_time() - t0
        ppl = perplexity(model, tok, stream=stream, progress=False).ppl
        out["rows"].append({"setting": name, "config": kw, "ppl": ppl, "ppl_change_percent": 100 * (ppl / res.ppl - 1),
                            "compress_cpu_seconds": round(cpu, 1)})
        print(json.dumps(out["rows"][-1]), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
