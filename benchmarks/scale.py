"""Scale benchmark: stream a synthetic checkpoint with REAL MoE layer shapes through
``moecore compress`` and measure per-layer time and peak memory.

The checkpoint has a few decoder layers of the real model's shapes (random bf16 weights, a
4,096-token vocabulary, sharded safetensors + index), so speed and memory are those of the
real model per layer; quality is not measured here (random weights).  The compression runs
in a child process, which reports:

* seconds per layer for load, calibrate, fit, propagate and write;
* peak host memory (``ru_maxrss`` of the child) and peak GPU memory
  (``torch.cuda.max_memory_allocated``) when ``--device cuda``;
* one layer's expert weights in bytes, for comparison;
* the extrapolated whole-model time (mean seconds per layer × the real number of MoE layers).

A child that fails or is killed (the kernel's OOM killer, at DeepSeek-V3's shape on a 24 GiB
machine) leaves ``failed-scale-<shape>-<device><tag>.json`` in the results folder instead: its
exit status, wall time, the parent's sampled peak of its anonymous memory with a timeline
(every 30 s: seconds, anonymous GiB, the machine's available GiB) and the end of its stderr.

Usage::

    python benchmarks/scale.py --shape qwen3-30b-a3b --layers 2 --device cpu --refine-steps 1 --calib-tokens 4096
    python benchmarks/scale.py --shape mixtral-8x7b --layers 2 --device cuda        # defaults = the product defaults
    python benchmarks/scale.py --render                                           # results/scale.md from the JSONs
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))
from provenance import provenance, set_overrides  # noqa: E402

#: the real shapes: hidden H, expert intermediate F, experts E, top-k, real MoE layers, attention
SHAPES = {
    "qwen3-30b-a3b": dict(family="qwen3_moe", H=2048, F=768, E=128, k=8, moe_layers=48, heads=32, kv=4, head_dim=128),
    "mixtral-8x7b": dict(family="mixtral", H=4096, F=14336, E=8, k=2, moe_layers=32, heads=32, kv=8, head_dim=128),
    "smoke": dict(family="qwen3_moe", H=128, F=64, E=8, k=2, moe_layers=4, heads=4, kv=2, head_dim=32),  # CI only
    # issue 21, point 4: peak RSS of a whole run against depth (48 MiB of bf16 experts per layer)
    "depth": dict(family="qwen3_moe", H=512, F=512, E=32, k=4, moe_layers=16, heads=8, kv=4, head_dim=64),
    "deepseek-v3": dict(family="deepseek_v3", H=7168, F=2048, E=256, k=8, moe_layers=58, heads=128, kv=128,
                        head_dim=128),
}


def hf_config(shape: str, layers: int):
    """A transformers config with the real layer shapes, ``layers`` decoder layers, vocab 4096."""
    from transformers import DeepseekV3Config, MixtralConfig, Qwen3MoeConfig

    s = SHAPES[shape]
    common = dict(vocab_size=4096, hidden_size=s["H"], num_hidden_layers=layers, num_attention_heads=s["heads"],
                  num_key_value_heads=s["kv"], max_position_embeddings=4096, tie_word_embeddings=False,
                  eos_token_id=0, bos_token_id=0, pad_token_id=0)
    if s["family"] == "qwen3_moe":
        return Qwen3MoeConfig(**common, intermediate_size=6144, moe_intermediate_size=s["F"], num_experts=s["E"],
                              num_experts_per_tok=s["k"], head_dim=s["head_dim"], decoder_sparse_step=1)
    if s["family"] == "mixtral":
        return MixtralConfig(**common, intermediate_size=s["F"], num_local_experts=s["E"], num_experts_per_tok=s["k"])
    return DeepseekV3Config(**common, intermediate_size=18432, moe_intermediate_size=s["F"], n_routed_experts=s["E"],
                            num_experts_per_tok=s["k"], n_shared_experts=1, first_k_dense_replace=0, n_group=8,
                            topk_group=4, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64,
                            qk_nope_head_dim=128, v_head_dim=128)


#: how the published checkpoints store each expert (as on the hub, one tensor set per expert):
#: the experts' parent module on disk and the gate / up / down tensor names
HUB_EXPERTS = {"qwen3_moe": ("mlp", "gate_proj", "up_proj", "down_proj"),
               "deepseek_v3": ("mlp", "gate_proj", "up_proj", "down_proj"),
               "mixtral": ("block_sparse_moe", "w1", "w3", "w2")}


def hub_tensors(family: str, name: str, shape: tuple, make):
    """``(stored name, tensor)`` pairs of the model tensor ``name`` as the family's published
    checkpoints store it: fused experts split into ``experts.{j}.{gate,up,down}.weight``.
    ``make(shape)`` draws one tensor; fused experts are drawn one expert at a time, so that a
    layer's experts never sit in memory whole (one DeepSeek-V3 layer's are 30 GB in float32)."""
    parent, gate, up, down = HUB_EXPERTS[family]
    name = name.replace(".mlp.", f".{parent}.")
    if name.endswith(".experts.gate_up_proj"):  # (E, 2F, H)
        base, f = name[: -len("gate_up_proj")], shape[1] // 2
        for j in range(shape[0]):
            t = make(shape[1:])
            yield f"{base}{j}.{gate}.weight", t[:f].clone()
            yield f"{base}{j}.{up}.weight", t[f:].clone()
    elif name.endswith(".experts.down_proj"):  # (E, H, F)
        base = name[: -len("down_proj")]
        for j in range(shape[0]):
            yield f"{base}{j}.{down}.weight", make(shape[1:])
    else:
        yield name, make(shape)


#: the synthetic checkpoint's shard size (a DeepSeek-V3 layer's 22.5 GB of experts span several)
SHARD_BYTES = 2 << 30


def write_checkpoint(shape: str, layers: int, folder: Path) -> dict:
    """Synthetic sharded bf16 checkpoint (at most one shard, 2 GiB, in memory) + a tokenizer,
    its experts stored one tensor set per expert as the published checkpoints are."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = hf_config(shape, layers)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)

    def make(shp):
        if len(shp) < 2:
            return torch.ones(shp, dtype=torch.bfloat16)
        return torch.randn(shp, generator=gen, dtype=torch.float32).mul_(shp[-1] ** -0.5).to(torch.bfloat16)

    weight_map, total, files = {}, 0, []
    groups: dict[str, dict] = {}
    for name, p in model.state_dict().items():
        key = name.split(".layers.")[1].split(".")[0] if ".layers." in name else "rest"
        groups.setdefault(key, {})[name] = p
    tensors, size = {}, 0

    def flush():
        nonlocal tensors, size
        if tensors:
            files.append(f"part-{len(files):05d}.safetensors")
            save_file(tensors, str(folder / files[-1]), metadata={"format": "pt"})
            weight_map.update({k: files[-1] for k in tensors})
        tensors, size = {}, 0

    for key, params in sorted(groups.items(), key=lambda kv: (kv[0] == "rest", kv[0].zfill(6))):
        for name, p in params.items():
            for stored, part in hub_tensors(SHAPES[shape]["family"], name, tuple(p.shape), make):
                if size + part.numel() * 2 > SHARD_BYTES:
                    flush()
                tensors[stored], size = part, size + part.numel() * 2
                total += part.numel() * 2
        flush()  # one decoder layer (or the rest) starts a new shard
    names = {f: f"model-{j + 1:05d}-of-{len(files):05d}.safetensors" for j, f in enumerate(files)}
    for f, n in names.items():
        (folder / f).rename(folder / n)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": {k: names[f] for k, f in weight_map.items()}}, indent=1))
    cfg.dtype = torch.bfloat16
    cfg.save_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(ROOT / "data" / "tokenizer")
    tok.save_pretrained(folder)
    s = SHAPES[shape]
    return {"bytes_on_disk": total, "expert_bytes_per_layer": s["E"] * 3 * s["H"] * s["F"] * 2}


_CHILD = r"""
import json, resource, sys, time
import torch
from moecore import CompressionConfig
from moecore.api import compress_checkpoint
from moecore.data import TextFile
import moecore.calibration as mcal, moecore.fitting as mfit, moecore.maths.fit as mmf
args = json.loads(sys.argv[1])
cfg = CompressionConfig(**args["cfg"])
stages = {"grams_s": 0.0, "whitening_s": 0.0, "fit_total_s": 0.0, "svd_s": 0.0, "errors_s": 0.0}
iters = []
def timed(owner, name, key, after=None):
    fn = getattr(owner, name)
    def wrapper(*a, **k):
        t = time.perf_counter()
        out = fn(*a, **k)
        stages[key] += time.perf_counter() - t
        if after: after(out)
        return out
    setattr(owner, name, wrapper)
timed(mcal.RoutedInputs, "grams", "grams_s")
timed(mmf, "whiten_in_place", "whitening_s")
timed(mmf, "truncated_svd", "svd_s")
if hasattr(mmf, "gram_svd"):
    timed(mmf, "gram_svd", "svd_s")
timed(mmf, "errors", "errors_s")
import moecore.checkpoint_reader as mcr
chunks = []  # a layer's experts read in chunks (larger than expert_read_gb)
stages["expert_read_s"] = 0.0
timed(mcr.CheckpointExperts, "read", "expert_read_s", lambda r: chunks.append(1))  # counts, keeps nothing
from moecore.forms import get_form
timed(type(get_form(cfg.form)), "fit", "fit_total_s", lambda r: iters.append(r.refine_iters))
import moecore.streaming as mstream
peaks = {}
_finish = mstream.finish
def finish(*a, **k):  # the peak RSS before the end of the run (merge, index, statistics)
    peaks["before_finish"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return _finish(*a, **k)
mstream.finish = finish
import threading
anon = {"max": 0, "file_at_max": 0}
def sample():  # anonymous memory (heap, tensors) apart from mapped files (a spilled Gram stack, the page cache)
    while True:
        try:
            st = dict(l.split(":", 1) for l in open("/proc/self/status") if l.startswith("Rss"))
            a = int(st["RssAnon"].split()[0]) * 1024
            if a > anon["max"]:
                anon.update(max=a, file_at_max=int(st["RssFile"].split()[0]) * 1024 + int(st["RssShmem"].split()[0]) * 1024)
        except (OSError, KeyError, ValueError):
            return
        time.sleep(0.05)
threading.Thread(target=sample, daemon=True).start()
t0 = time.perf_counter()
res = compress_checkpoint(args["src"], args["out"], cfg, TextFile(args["calib"]), device=args["device"], progress=True)
res["stages"], res["refine_iters"] = stages, iters
res["wall_s"] = time.perf_counter() - t0
res["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
res["peak_anon_bytes"], res["file_at_peak_anon_bytes"] = anon["max"], anon["file_at_max"]
res["peak_rss_before_finish_bytes"] = peaks.get("before_finish")
res["peak_gpu_bytes"] = torch.cuda.max_memory_allocated() if args["device"].startswith("cuda") else None
res["expert_chunks_read"] = len(chunks)
print("RESULT " + json.dumps(res))
"""


def _anon_gib(pid: int) -> float | None:
    """Process ``pid``'s anonymous resident memory (``RssAnon``) in GiB, ``None`` if unreadable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return int(next(line for line in f if line.startswith("RssAnon:")).split()[1]) / 2**20
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def watched(cmd: list[str], folder: Path, every: float = 0.5, log_every: float = 30.0):
    """Run ``cmd`` with its output in files (no pipe to fill) while sampling its anonymous
    memory: ``(returncode, stdout, stderr, watch)``, ``watch`` holding the wall time, the
    sampled peak and a timeline ``[seconds, anon GiB, available GiB]`` every ``log_every`` s.
    It is what remains of a run the kernel kills for memory: the child's own 50 ms sampler dies
    with it."""
    from moecore.heap import available_host_bytes

    out, err = folder / "child.out", folder / "child.err"
    t0 = time.perf_counter()
    with open(out, "w") as fo, open(err, "w") as fe:
        proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, text=True)
        peak, timeline, last = 0.0, [], -log_every
        while proc.poll() is None:
            now = time.perf_counter() - t0
            anon = _anon_gib(proc.pid)
            peak = max(peak, anon or 0.0)
            if now - last >= log_every:
                av = available_host_bytes()
                timeline.append([round(now, 1), None if anon is None else round(anon, 3),
                                 None if av is None else round(av / 2**30, 2)])
                last = now
            time.sleep(every)
    watch = {"wall_s": round(time.perf_counter() - t0, 1), "sampled_peak_anon_gib": round(peak, 3),
             "timeline": timeline}
    return proc.returncode, out.read_text(), err.read_text(), watch


def run(a) -> dict:
    import torch
    import transformers

    import moecore
    from moecore.data import load_split

    with tempfile.TemporaryDirectory(prefix="moecore-scale-", dir=a.workdir) as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        info = write_checkpoint(a.shape, a.layers, tmp / "src")
        write_s = time.perf_counter() - t0
        from moecore.heap import trim
        trim()  # the shards' freed pages back to the OS: this process waits beside the measured one
        (tmp / "calib.txt").write_text("\n\n".join(load_split("calib")), encoding="utf-8")
        cfg = {"target_ratio": a.ratio, "calib_max_tokens": a.calib_tokens}
        if a.refine_steps is not None:
            cfg["refine_steps"] = a.refine_steps
        if a.svd:
            cfg["svd"] = a.svd
        if a.form:
            cfg["form"] = a.form
        if a.recover_steps is not None:
            cfg["recover_steps"] = a.recover_steps
        if a.expert_read_gb is not None:
            cfg["expert_read_gb"] = a.expert_read_gb
        if a.recover_memory_gb is not None:
            cfg["recover_memory_gb"] = a.recover_memory_gb
        if a.gram_host_gb is not None:
            cfg["gram_host_gb"] = a.gram_host_gb
        cfg.update(set_overrides(a.set))  # --set KEY=VALUE: any other CompressionConfig field
        child = {"src": str(tmp / "src"), "out": str(tmp / "out"), "calib": str(tmp / "calib.txt"),
                 "device": a.device, "cfg": cfg}
        rc, stdout, stderr, watch = watched([sys.executable, "-c", _CHILD, json.dumps(child)], tmp)
        if rc != 0:  # killed (e.g. for memory) or failed: what was seen of it, then stop
            dev = "cuda" if a.device.startswith("cuda") else "cpu"
            path = a.results / f"failed-scale-{a.shape}-{dev}{a.tag}.json"
            path.write_text(json.dumps({
                "shape": a.shape, "layers": a.layers, "device": a.device, "config": cfg, "returncode": rc,
                "signal": -rc if rc < 0 else None, "checkpoint_write_s": round(write_s, 1), **watch,
                "stderr_tail": stderr[-3000:], "command": " ".join(["python", "benchmarks/scale.py"] + sys.argv[1:]),
                "provenance": provenance(config={"args": vars(a), "compression": cfg})}, indent=2) + "\n")
            raise SystemExit(f"compression failed (exit status {rc}; what was sampled of it: {path}):\n"
                             f"{stderr[-3000:]}")
        res = json.loads(next(line for line in stdout.splitlines() if line.startswith("RESULT "))[7:])
    per = res["timings"]
    cost = cost_report(a, res, cfg)
    mean = {k: sum(t.get(k, 0.0) for t in per) / len(per)
            for k in ("load_s", "calibrate_s", "fit_s", "recover_s", "propagate_s", "write_s")}
    per_layer = sum(mean.values())
    s = SHAPES[a.shape]
    out = {
        "shape": a.shape, "layers": a.layers, "device": a.device, "config": cfg, **info,
        "checkpoint_write_s": round(write_s, 1), "wall_s": round(res["wall_s"], 1),
        "per_layer": [{k: round(v, 2) if isinstance(v, float) else v for k, v in t.items()} for t in per],
        "mean_per_layer_s": {k: round(v, 2) for k, v in mean.items()}, "seconds_per_layer": round(per_layer, 2),
        "extrapolated_model_minutes": round(per_layer * s["moe_layers"] / 60, 1), "real_moe_layers": s["moe_layers"],
        "peak_rss_gib": round(res["peak_rss_bytes"] / 2**30, 2),
        # sampled every 50 ms: anonymous memory (what must fit in RAM) apart from mapped file pages
        "peak_anon_gib": round(res["peak_anon_bytes"] / 2**30, 2) if res.get("peak_anon_bytes") else None,
        "peak_rss_before_finish_gib": (None if res.get("peak_rss_before_finish_bytes") is None else
                                       round(res["peak_rss_before_finish_bytes"] / 2**30, 3)),
        "peak_gpu_gib": None if res["peak_gpu_bytes"] is None else round(res["peak_gpu_bytes"] / 2**30, 2),
        "expert_gib_per_layer": round(info["expert_bytes_per_layer"] / 2**30, 2),
        "expert_chunks_read": res.get("expert_chunks_read"),
        "expert_read_s": round(res["stages"].get("expert_read_s", 0.0), 2),
        "recovery": [{k: round(v, 6) if isinstance(v, float) else v for k, v in r.items()} for r in res.get("recovery", [])],
        "versions": {"moecore": moecore.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
        "hardware": (torch.cuda.get_device_name() if a.device.startswith("cuda") else
                     f"{platform.processor() or platform.machine()} CPU, {_cores()} cores"),
        "command": " ".join(["python", "benchmarks/scale.py"] + sys.argv[1:]),
        "cost_model": cost,
        "provenance": provenance(config={"args": vars(a), "compression": cfg}),
    }
    return out


# ---------------------------------------------------------------------------- cost model
def fit_flops(E: int, d_out: int, d_in: int, s: int, passes: int, method: str, oversample: int = 8,
              power: int = 4, warm: int = 1) -> dict[str, float]:
    """GEMM FLOPs (2 per multiply-add) of :func:`moecore.maths.fit.fit_delta` + ``errors`` for one
    projection: ``passes`` factor passes (1 + refinement steps run).  Keys: ``core_start``,
    ``whitened_products`` (``(W_i − C) L_i`` per pass, ``P`` once), ``svd`` (randomized range-finder products, or the Gram products of the exact path),
    ``refinement`` (``L_i B̃_i``, ``N``), ``errors`` (``A_i B_iᵀ``)."""
    from moecore.maths.triangular import dense_fraction

    o, i, k = d_out, d_in, s + oversample
    tri = dense_fraction(i)  # products with the triangular L_i skip its zero half (moecore.maths.triangular)
    big = 2.0 * E * o * i * i * tri
    out = {"core_start": 2.0 * E * o * i,
           # P = Σ R_i L_i L_iᵀ + C₀ S in the first pass, for the core steps and the report's Σ‖W_i L_i‖²
           "whitened_products": big * (passes + 1) + 2.0 * o * i * i,
           "refinement": passes * (2.0 * E * i * i * s * tri + 2.0 * E * o * i * s),
           # the report's errors: Ŵ_i = C + A_i B_iᵀ (both whitened sums come from the fit itself)
           "errors": 2.0 * E * o * i * s}
    if method == "randomized" and k < min(o, i):
        prod, small = 2.0 * E * o * i * k, 2.0 * E * o * k * k
        out["svd"] = (2 + 2 * power) * prod + small + (passes - 1) * ((2 + 2 * warm) * prod + small)
    else:
        out["svd"] = passes * (2.0 * E * o * i * min(o, i) + 2.0 * E * o * i * s)
    return out


def layer_flops(E: int, H: int, F: int, k: int, tokens: int, ranks: dict, passes: dict, methods: dict) -> dict:
    """FLOPs per stage of one MoE layer: ``calibration_forward`` (router + experts GEMMs of the
    layer's forward; attention is left out), ``grams`` (``in`` and ``mid`` Grams with the gate/up
    products), ``whitening`` (Cholesky ``d³/3`` per expert), and the fit's stages per projection
    (:func:`fit_flops`, summed).  ``gemm`` sums the GEMM-only stages (what FlopCounterMode sees)."""
    routed = tokens * k
    st = {"calibration_forward": 2.0 * tokens * H * E + routed * 3 * 2.0 * H * F,
          "grams": 2.0 * routed * H * H + 2.0 * routed * (2 * H * F + F * F),
          "whitening": E * (H ** 3 + F ** 3) / 3.0}
    fit = {}
    for p, (o, i) in {"gate": (F, H), "up": (F, H), "down": (H, F)}.items():
        for key, v in fit_flops(E, o, i, ranks[p], passes[p], methods[p]).items():
            fit[key] = fit.get(key, 0.0) + v
    st.update(fit)
    st["gemm"] = st["grams"] + sum(fit.values())
    return st


def gemm_peak(n: int = 2048, repeats: int = 3) -> dict:
    """Measured ``torch.mm`` throughput on ``n × n`` matrices, float32 and float64: GFLOP/s per
    wall second and per CPU second × threads (the machine's peak when it is not shared)."""
    import torch

    out = {}
    for dt in (torch.float32, torch.float64):
        a, b = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
        torch.mm(a, b)
        w, c = time.perf_counter(), time.process_time()
        for _ in range(repeats):
            torch.mm(a, b)
        w, c = time.perf_counter() - w, time.process_time() - c
        fl = repeats * 2.0 * n ** 3
        out[str(dt).split(".")[1]] = {"gflops_wall": round(fl / w / 1e9, 1),
                                      "gflops_cpu": round(fl / c / 1e9 * torch.get_num_threads(), 1)}
    return out


def ranks_and_methods(shape: str, ratio: float, cfg) -> tuple[dict, dict]:
    """Uniform delta ranks at ``ratio`` (what the cost model counts) and the SVD path
    ``cfg`` takes for each projection of ``shape`` (the form's SVD width)."""
    from moecore.fitting import svd_method
    from moecore.forms import get_form
    from moecore.maths import budget

    s = SHAPES[shape]
    E, H, F = s["E"], s["H"], s["F"]
    dims = {p: (F, H) if p != "down" else (H, F) for p in ("gate", "up", "down")}
    ranks = budget.solve_uniform(get_form("delta"), [budget.ProjectionShape(p, E, *dims[p]) for p in dims], ratio)
    form = get_form(cfg.form)
    return ranks, {p: svd_method(cfg, *dims[p], form.svd_width(ranks[p], cfg.expert_rank_cap)) for p in dims}


def cost_report(a, res: dict, cfg: dict) -> dict:
    """Analytic FLOPs per stage next to the measured seconds, each stage's achieved GFLOP/s as a
    fraction of the measured float32 GEMM peak (the fit's working precision at these shapes) and
    the whole-model extrapolation."""
    from moecore.config import CompressionConfig

    s = SHAPES[a.shape]
    E, H, F, k = s["E"], s["H"], s["F"], s["k"]
    ranks, methods = ranks_and_methods(a.shape, a.ratio, CompressionConfig(**cfg))
    layers = len(res["timings"])
    it = res["refine_iters"]
    passes = {p: 1 + sum(it[j] for j in range(n, len(it), 3)) / max(1, len(it[n::3])) for n, p in enumerate(ranks)}
    tokens = min(a.calib_tokens, 10 ** 9)
    fl = layer_flops(E, H, F, k, tokens, ranks, passes, methods)
    peak = gemm_peak()
    st = {key: v / layers for key, v in res["stages"].items()}
    mean = {key: sum(t[key] for t in res["timings"]) / layers for key in ("calibrate_s", "fit_s", "write_s")}
    fit_products = st["fit_total_s"] - st["svd_s"]
    secs = {"calibration_forward": mean["calibrate_s"], "grams": st["grams_s"], "whitening": st["whitening_s"],
            "whitened_products+refinement": fit_products, "svd": st["svd_s"], "errors": st["errors_s"],
            "write": mean["write_s"], "fit (all)": mean["fit_s"]}
    flops = {"calibration_forward": fl["calibration_forward"], "grams": fl["grams"], "whitening": fl["whitening"],
             "whitened_products+refinement": fl["whitened_products"] + fl["refinement"] + fl["core_start"],
             "svd": fl["svd"], "errors": fl["errors"], "write": 0.0}
    flops["fit (all)"] = sum(flops[x] for x in ("grams", "whitening", "whitened_products+refinement", "svd", "errors"))
    p32 = peak["float32"]["gflops_wall"]
    rows = {key: {"seconds": round(secs[key], 2), "gflop": round(flops[key] / 1e9, 1),
                  "gflops_achieved": round(flops[key] / max(secs[key], 1e-9) / 1e9, 1),
                  "fraction_of_f32_peak": round(flops[key] / max(secs[key], 1e-9) / 1e9 / p32, 3)} for key in secs}
    return {"ranks": ranks, "svd": methods, "passes": passes, "calib_tokens": tokens, "gemm_peak": peak,
            "stages": rows, "lower_bound_s_at_f32_peak": round(flops["fit (all)"] / 1e9 / p32, 1),
            "whole_model_minutes": round((sum(mean.values())) * s["moe_layers"] / 60, 1)}


def cost_only(a) -> dict:
    """The fit's FLOPs of one layer at ``a``'s settings (uniform delta ranks at ``a.ratio``,
    ``1 + refine_steps`` passes, the auto SVD path), from :func:`layer_flops`, with the
    minutes they take at this machine's float32 ``torch.mm`` peak, measured now."""
    from moecore.config import CompressionConfig

    s = SHAPES[a.shape]
    E, H, F, k = s["E"], s["H"], s["F"], s["k"]
    cfg = CompressionConfig(**{key: v for key, v in {"refine_steps": a.refine_steps, "form": a.form, "svd": a.svd}.items()
                               if v is not None})
    ranks, methods = ranks_and_methods(a.shape, a.ratio, cfg)
    fl = layer_flops(E, H, F, k, a.calib_tokens, ranks, {p: 1 + cfg.refine_steps for p in ranks}, methods)
    fit = sum(fl[x] for x in ("grams", "whitening", "core_start", "whitened_products", "refinement", "svd", "errors"))
    peak = gemm_peak()["float32"]["gflops_wall"]
    return {"shape": a.shape, "ranks": ranks, "svd": methods, "refine_steps": cfg.refine_steps,
            "calib_tokens": a.calib_tokens, "tflop": {key: round(v / 1e12, 2) for key, v in fl.items()},
            "fit_tflop": round(fit / 1e12, 1), "float32_peak_gflops": peak,
            "fit_minutes_at_peak": round(fit / (peak * 1e9) / 60, 1)}


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0))


def render(results: Path) -> str:
    rows = [json.loads(p.read_text()) for p in sorted(results.glob("scale-*.json"))]
    lines = ["| shape | device | config | layers | s/layer (calibrate / fit / recover / write) | whole model (extrapolated) "
             "| peak host | peak GPU | one layer's experts |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["mean_per_layer_s"]
        lines.append(
            f"| {r['shape']} | {r['hardware']} | {json.dumps(r['config'])} | {r['layers']} | {r['seconds_per_layer']} "
            f"({m['calibrate_s']} / {m['fit_s']} / {m.get('recover_s', 0.0)} / {m['write_s']}) | "
            f"{r['extrapolated_model_minutes']} min "
            f"× {r['real_moe_layers']} layers | {r['peak_rss_gib']} GiB | "
            f"{'not measured' if r['peak_gpu_gib'] is None else str(r['peak_gpu_gib']) + ' GiB'} | "
            f"{r['expert_gib_per_layer']} GiB |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-30b-a3b")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--calib-tokens", type=int, default=32768)
    ap.add_argument("--refine-steps", type=int, default=None, help="default: the product default")
    ap.add_argument("--svd", choices=["auto", "exact", "gram", "randomized"], default=None)
    ap.add_argument("--form", default=None, help="default: the product default (CompressionConfig.form)")
    ap.add_argument("--recover-steps", type=int, default=None,
                    help="in-engine recovery steps per layer (default: the product default; §7 was recorded "
                         "before it existed, i.e. with 0)")
    ap.add_argument("--expert-read-gb", type=float, default=None,
                    help="read a layer's experts this many GiB at a time when larger (default: the product default)")
    ap.add_argument("--recover-memory-gb", type=float, default=None,
                    help="in-engine recovery trains a chunk of experts at a time when its trained tensors take more "
                         "(default: the product default)")
    ap.add_argument("--gram-host-gb", type=float, default=None,
                    help="Gram stacks larger than this many GiB in a scratch file (default: the product default)")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="override any CompressionConfig field, e.g. --set 'quant={\"core_bits\": 4}' (repeatable)")
    ap.add_argument("--workdir", default=None, help="where the synthetic checkpoint is written (needs disk space)")
    ap.add_argument("--tag", default="", help="suffix of the result file name")
    ap.add_argument("--render", action="store_true", help="only render results/scale.md from the JSON files")
    ap.add_argument("--cost-only", action="store_true",
                    help="run nothing: print the cost model's FLOPs of one layer's fit at these settings and the "
                         "minutes they take at this machine's measured float32 GEMM peak")
    ap.add_argument("--results", type=Path, default=RESULTS, help="where the JSON and scale.md go")
    a = ap.parse_args()
    if a.cost_only:
        print(json.dumps(cost_only(a), indent=1))
        return
    a.results.mkdir(parents=True, exist_ok=True)  # before the run: its record must have a place
    if not a.render:
        res = run(a)
        dev = "cuda" if a.device.startswith("cuda") else "cpu"
        path = a.results / f"scale-{a.shape}-{dev}{a.tag}.json"
        path.write_text(json.dumps(res, indent=2) + "\n")
        print(json.dumps({k: res[k] for k in ("shape", "device", "seconds_per_layer", "mean_per_layer_s",
                                              "extrapolated_model_minutes", "peak_rss_gib", "peak_anon_gib",
                                              "peak_gpu_gib")}, indent=1))
    (a.results / "scale.md").write_text(render(a.results))


if __name__ == "__main__":
    main()
