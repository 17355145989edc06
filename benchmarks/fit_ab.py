"""A/B of one experts module's fit (``moecore.fitting.fit_experts``) between two source trees.

Each measurement runs in a child process with ``PYTHONPATH`` set to one tree's ``src``, on a
random Qwen3-MoE-shaped experts module (bf16-rounded weights, synthetic routed inputs with
a decaying spectrum), and reports CPU seconds (``time.process_time``, all threads) and wall
seconds of the fit alone.  Old and new alternate (ABAB...) so shared-machine noise hits both.

Usage::

    python benchmarks/fit_ab.py --old /tmp/fit-old/src --new src --E 16 --H 1024 --F 512 --repeats 2
    python benchmarks/fit_ab.py --old /tmp/fit-old/src --new src --readme models/tiny-mixtral --repeats 1
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

_CHILD = r"""
import json, sys, time
import torch
from transformers import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
from moecore import CompressionConfig
from moecore.calibration import RoutedInputs
from moecore.families import find_experts
from moecore.fitting import fit_experts, projection_shapes, solve_ranks
a = json.loads(sys.argv[1])
torch.manual_seed(0)
cfg_hf = Qwen3MoeConfig(hidden_size=a["H"], moe_intermediate_size=a["F"], num_experts=a["E"], num_experts_per_tok=a["k"])
block = Qwen3MoeSparseMoeBlock(cfg_hf)
with torch.no_grad():
    for p in block.parameters():
        p.copy_((torch.randn(p.shape) * p.shape[-1] ** -0.5).bfloat16().float())
path, mod, layout = next((p, m, l) for p, m, l in find_experts(block))
t = a["tokens"]
x = (torch.randn(t, a["H"]) * torch.logspace(0, -2, a["H"])).bfloat16().float()  # decaying input spectrum
idx = torch.stack([torch.randperm(a["E"])[: a["k"]] for _ in range(t)])
w = torch.softmax(torch.randn(t, a["k"]), -1)
inputs = RoutedInputs(x, idx, w, a["E"], "routing")
cfg = CompressionConfig(target_ratio=0.25, **a["cfg"])
ranks = solve_ranks(projection_shapes("m", mod, layout), cfg)
ranks = {k[1]: v for k, v in ranks.items()}
c0, w0 = time.process_time(), time.perf_counter()
new = fit_experts(mod, layout, cfg, ranks, inputs, "cpu", 0)
res = {"cpu_s": time.process_time() - c0, "wall_s": time.perf_counter() - w0,
       "out_err": {p: new.report[p]["output_rel_error"] for p in ("gate", "up", "down")},
       "iters": {p: new.report[p]["refine_iters"] for p in ("gate", "up", "down")}, "ranks": ranks}
print("RESULT " + json.dumps(res))
"""


_README = r"""
import json, sys, time
import torch
import moecore
from moecore.data import load_split
from transformers import AutoModelForCausalLM, AutoTokenizer
a = json.loads(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(a["model"], dtype="float32")
tok = AutoTokenizer.from_pretrained(a["model"])
texts = load_split("calib")
# the same work in both trees: the delta form without in-engine recovery (the old tree has
# neither the ragged default nor recovery); "defaults": today's product defaults instead
fields = moecore.CompressionConfig.__dataclass_fields__
same = {"form": "delta", **({"recover_steps": 0} if "recover_steps" in fields else {})}
cfg = moecore.CompressionConfig(target_ratio=0.25, **({} if a.get("defaults") else same))
c0, w0 = time.process_time(), time.perf_counter()
model = moecore.compress(model, cfg, calibration=texts, tokenizer=tok)
print("RESULT " + json.dumps({"cpu_s": time.process_time() - c0, "wall_s": time.perf_counter() - w0}))
"""


def one(src: str, args: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=src, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    code = _README if "model" in args else _CHILD
    r = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    return json.loads(next(s for s in r.stdout.splitlines() if s.startswith("RESULT "))[7:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", required=True)
    ap.add_argument("--new", required=True)
    ap.add_argument("--E", type=int, default=16)
    ap.add_argument("--H", type=int, default=1024)
    ap.add_argument("--F", type=int, default=512)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--refine-steps", type=int, default=10)
    ap.add_argument("--svd", default="auto")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--readme", default=None, help="a model folder: time the README's Python example on it instead (delta form, no recovery, in both trees; then the new tree once more at the product defaults)")
    a = ap.parse_args()
    args = {"E": a.E, "H": a.H, "F": a.F, "k": a.k, "tokens": a.tokens,
            "cfg": {"refine_steps": a.refine_steps, "svd": a.svd}}
    if a.readme:
        args = {"model": str(Path(a.readme).resolve())}
    rows = []
    for i in range(a.repeats):
        for name, src in (("old", a.old), ("new", a.new)):
            r = one(src, args)
            r["tree"] = name
            rows.append(r)
            print(json.dumps(r), flush=True)
        if a.readme:  # and the README example as a user runs it today: the product defaults
            r = one(a.new, {**args, "defaults": True})
            r["tree"] = "new, product defaults"
            rows.append(r)
            print(json.dumps(r), flush=True)
    cpu = {n: min(r["cpu_s"] for r in rows if r["tree"] == n) for n in ("old", "new")}
    print(json.dumps({"shape": args, "min_cpu_s": cpu, "speedup_cpu": cpu["old"] / cpu["new"]}))


if __name__ == "__main__":
    main()
