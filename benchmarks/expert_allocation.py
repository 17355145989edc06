"""Issue 17, point 2: does spending the rank budget unevenly across the experts of a
projection pay, at equal stored parameters?

For every projection of every MoE layer of a bundled model: the output-optimal shared core
``C`` (moecore.maths.fit.output_core on the routing-weighted Grams of the calibration split),
then each expert's whitened residual ``(W_i − C) L_i`` (``L_i L_iᵀ = G_i + λ·mean(diag)·I``)
and its singular values.  Two allocations of the same number of rank units (so the same
stored parameters: one unit is ``d_out + d_in`` in every expert of a projection):

- ``uniform``: rank ``r`` in every expert (what moecore stores today at this ratio);
- ``waterfill``: the ``E·r`` largest ``σ²`` over all experts of the projection (the optimum of
  the summed routing-weighted whitened error for a fixed core; per-expert ranks).

Each expert's weights are replaced by ``C + U_r Σ_r V_rᵀ L_i⁻¹`` (the same dense weights the
delta form's forward computes), and the held-out perplexity (RESULTS protocol, whole split) is
measured for both.  No refinement of the core, no recovery: the two arms differ only in where
the ranks go.

    python benchmarks/expert_allocation.py --model tiny-qwen3moe --ratio 0.25
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from moecore.data import load_split, token_stream
from moecore.evaluation import perplexity
from moecore.maths.fit import output_core

ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64


def capture(model, ids: torch.Tensor, batch: int = 8) -> dict[int, tuple]:
    """Per layer: ``(x (N, H), top_k_index (N, k), top_k_weights (N, k))`` of the experts call."""
    out: dict[int, list] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        def pre(mod, args, kwargs, i=i):
            x, idx, w = (kwargs[k] if k in kwargs else args[j]
                         for j, k in enumerate(("hidden_states", "top_k_index", "top_k_weights")))
            out.setdefault(i, []).append((x.reshape(-1, x.shape[-1]), idx.reshape(-1, idx.shape[-1]),
                                          w.reshape(-1, w.shape[-1])))
        hooks.append(layer.mlp.experts.register_forward_pre_hook(pre, with_kwargs=True))
    with torch.no_grad():
        for b in ids.split(batch):
            model(input_ids=b)
    for h in hooks:
        h.remove()
    return {i: tuple(torch.cat(parts) for parts in zip(*v)) for i, v in out.items()}


def grams(x, idx, w, num_experts, fn=None, prior_tokens: float = 64.0):
    """Routing-weighted Gram per expert ``(E, d, d)`` of ``x`` (or of ``fn(e, x_e)``), each plus
    ``κ·Ḡ`` (the Gram of an average routed token times ``κ = prior_tokens``, moecore's
    ``calib_prior_tokens`` default): an expert no calibration token reached is fitted to the
    layer's input distribution, as moecore does."""
    gs = []
    for e in range(num_experts):
        rows, ks = (idx == e).nonzero(as_tuple=True)
        xe = x[rows].to(F64)
        if fn is not None:
            xe = fn(e, xe)
        xe = xe * w[rows, ks].to(F64)[:, None]
        gs.append(xe.T @ xe)
    g = torch.stack(gs)
    return g + (prior_tokens / float((idx >= 0).sum())) * g.sum(0)


def spectra(W: torch.Tensor, G: torch.Tensor, damping: float):
    """Core, whitening factors and the SVD of every expert's whitened residual."""
    C = output_core(W, G, damping)
    eye = torch.eye(G.shape[-1], dtype=F64)
    L = torch.linalg.cholesky(G + damping * G.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None] * eye)
    U, S, Vh = torch.linalg.svd((W - C) @ L, full_matrices=False)
    return C, L, U, S, Vh


def uniform_rank(e: int, d_out: int, d_in: int, ratio: float) -> int:
    """Rank per expert so that core + factors hold ``ratio`` of the projection's parameters."""
    return max(0, int((ratio * e * d_out * d_in - d_out * d_in) // (e * (d_out + d_in))))


def allocate(S: torch.Tensor, r: int, how: str) -> torch.Tensor:
    """Ranks per expert ``(E,)`` summing to ``E·r`` (capped at the full rank)."""
    e, full = S.shape
    if how == "uniform":
        return torch.full((e,), min(r, full), dtype=torch.long)
    order = (S ** 2).flatten().argsort(descending=True)[: e * r]
    return torch.bincount(order // full, minlength=e)


def rebuild(C, L, U, S, Vh, ranks):
    """``C + U_r Σ_r V_rᵀ L⁻¹`` for every expert, with its own rank."""
    out = []
    for i, r in enumerate(ranks.tolist()):
        lowrank = (U[i, :, :r] * S[i, :r]) @ Vh[i, :r]  # (d_out, d_in), whitened
        out.append(C + torch.linalg.solve_triangular(L[i].mT, lowrank.mT, upper=True).mT)
    return torch.stack(out)


def run(model_name: str, ratio: float, calib_tokens: int, damping: float, max_tokens: int | None) -> dict:
    d = ROOT / "models" / model_name
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    ids = token_stream(tok, load_split("calib"))[: calib_tokens // 512 * 512].reshape(-1, 512)
    t0 = time.time()
    acts = capture(model, ids)
    heldout = token_stream(tok, load_split("heldout"))
    result = {"model": model_name, "ratio": ratio, "calib_tokens": ids.numel(), "damping": damping, "layers": []}
    weights = {how: {} for how in ("uniform", "waterfill")}
    for i, layer in enumerate(model.model.layers):
        ex = layer.mlp.experts
        x, idx, w = acts[i]
        gu, dn = ex.gate_up_proj.detach().to(F64), ex.down_proj.detach().to(F64)  # (E, 2F, H), (E, H, F)
        e, two_f, h = gu.shape
        assert dn.shape == (e, h, two_f // 2), "expects transformers' fused (E, 2F, H) / (E, H, F) layout"
        f = two_f // 2
        g_in = grams(x, idx, w, e)

        def mid(k, xe):  # act(gate)·up with the original weights: the down projection's input
            g_u = xe @ gu[k].T
            return F.silu(g_u[:, :f]) * g_u[:, f:]

        g_mid = grams(x, idx, w, e, mid)
        rebuilt = {how: [] for how in weights}
        rec = {"layer": i}
        for name, W, G in (("gate", gu[:, :f], g_in), ("up", gu[:, f:], g_in), ("down", dn, g_mid)):
            C, L, U, S, Vh = spectra(W, G, damping)
            r = uniform_rank(e, *W.shape[1:], ratio)
            total = float((S ** 2).sum())
            for how in weights:
                ranks = allocate(S, r, how)
                kept = float(sum((S[k, :n] ** 2).sum() for k, n in enumerate(ranks.tolist())))
                rec[f"{name}_{how}"] = {"rank": r, "min": int(ranks.min()), "max": int(ranks.max()),
                                        "whitened_rel_error": (total - kept) / total}
                rebuilt[how].append(rebuild(C, L, U, S, Vh, ranks))
        for how in weights:
            g_, u_, d_ = rebuilt[how]
            weights[how][i] = (torch.cat([g_, u_], 1).to(torch.float32), d_.to(torch.float32))
        result["layers"].append(rec)
    result["fit_s"] = time.time() - t0
    for how, per_layer in weights.items():
        for i, (gu_new, dn_new) in per_layer.items():
            ex = model.model.layers[i].mlp.experts
            ex.gate_up_proj.data.copy_(gu_new)
            ex.down_proj.data.copy_(dn_new)
        res = perplexity(model, tok, stream=heldout, max_tokens=max_tokens, progress=False)
        result[how] = {"ppl": res.ppl, "tokens_scored": res.tokens_scored}
        print(json.dumps({"model": model_name, "allocation": how, "ppl": round(res.ppl, 4)}), flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["tiny-mixtral", "tiny-qwen3moe"], default="tiny-qwen3moe")
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--calib-tokens", type=int, default=32768)
    ap.add_argument("--damping", type=float, default=0.01)
    ap.add_argument("--max-tokens", type=int, default=None, help="held-out tokens (default: the whole split)")
    ap.add_argument("--out", type=Path, default=None, help="write the result JSON here")
    args = ap.parse_args()
    res = run(args.model, args.ratio, args.calib_tokens, args.damping, args.max_tokens)
    text = json.dumps(res, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    for rec in res["layers"]:
        print(rec["layer"], {k: (v["min"], v["max"], round(v["whitened_rel_error"], 4)) for k, v in rec.items()
                             if k != "layer"})


if __name__ == "__main__":
    main()
