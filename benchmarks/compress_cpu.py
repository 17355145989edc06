"""CPU seconds of one in-memory ``moecore.compress`` of a bundled model, for comparing commits
side by side (issue 17: the new default may take at most twice the CPU time of commit 3ad3226's).

``--src`` is the ``src`` folder of the moecore to time (e.g. a ``git worktree`` of an older
commit); it is put first on ``sys.path``, so one virtual environment times both trees.
Prints one JSON line: ``time.process_time()`` (all of the process's threads) and wall seconds
around ``moecore.compress`` with the bundled calibration split and ``target_ratio=0.25``.

    git worktree add /tmp/old 3ad3226
    python benchmarks/compress_cpu.py --src /tmp/old/src --model tiny-qwen3moe
    python benchmarks/compress_cpu.py --src src --model tiny-qwen3moe --set form=ragged
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from provenance import set_overrides  # noqa: E402  (imports no moecore: --src decides which one)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=ROOT / "src")
    ap.add_argument("--model", choices=["tiny-mixtral", "tiny-qwen3moe"], default="tiny-qwen3moe")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a CompressionConfig field")
    args = ap.parse_args()
    sys.path.insert(0, str(args.src.resolve()))
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import moecore
    from moecore.data import load_split

    kw = set_overrides(args.set)
    d = ROOT / "models" / args.model
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    cfg = moecore.CompressionConfig(target_ratio=0.25, **kw)
    cpu, wall = time.process_time(), time.perf_counter()
    moecore.compress(model, cfg, calibration=load_split("calib"), tokenizer=tok, progress=False)
    print(json.dumps({"moecore": moecore.__file__, "model": args.model, "set": kw, "threads": torch.get_num_threads(),
                      "cpu_s": round(time.process_time() - cpu, 1), "wall_s": round(time.perf_counter() - wall, 1)}))


if __name__ == "__main__":
    main()
