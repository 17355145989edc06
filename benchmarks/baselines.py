"""Baselines for ``quality_per_byte.py``, each applied in place to a transformers MoE model so
that the real model code runs:

- :func:`collect_expert_stats`: one calibration pass with hooks on every experts module:
  router hit counts, the REAP-like score (mean over the tokens routed to an expert of
  gate weight x ||expert output||) and each expert's mean output over all tokens reaching
  the layer (the HC-SMoE representation);
- :func:`prune_experts` (REAP-like): drop the lowest-scoring experts per layer; the router
  logits of pruned experts are masked to -inf *inside* the real router (a
  ``TorchFunctionMode`` on the router's ``F.linear``), so top-k and the renormalisation
  run over the kept experts only; pruned weights are zeroed;
- :func:`merge_experts` (HC-SMoE-like): average-linkage hierarchical clustering of the mean
  outputs (cosine distance), frequency-weighted average of the weights in each cluster,
  every member then holds the merged weights (= router mapped to the representative);
- :func:`rtn_quantize`: round-to-nearest asymmetric group quantization (torchao's
  ``choose_qparams_affine`` / ``quantize_affine`` / ``dequantize_affine`` when torchao is
  installed, else the same maths written out here), weights replaced by their dequantized
  values;
- :func:`mobe_compress`: MoBE (arXiv 2508.05257) as its authors' ``train.py`` fits it:
  per-expert ``A_e`` times an activation of a softmax mix of shared bases, Adam on the
  plain weight reconstruction error (see the block comment above :func:`mobe_rank`);
- :func:`hqq_quantize`: HQQ (half-quadratic optimized scale and zero point, the ``hqq``
  library via :func:`moecore.quant.quantize`), bit-packed codes + float16 scale and zero per
  group, weights replaced by their dequantized values.

Every function returns the stored expert bytes it accounts for (see each docstring).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from moecore.errors import ConfigError
from moecore.families import find_experts

BF16_BYTES = 2


def experts_of(model) -> list[tuple[str, nn.Module, object]]:
    """``(path, module, layout)`` of every original experts module."""
    return find_experts(model)


def per_expert_params(module) -> int:
    """Parameters of ONE expert: every tensor with the experts dim E leading, divided by E."""
    e = module.num_experts
    return sum(p.numel() for p in module.parameters() if p.shape[0] == e) // e


def _expert_fn(module, layout):
    """``(x (n,H), e) -> (n,H)``: expert ``e`` of ``module`` in plain PyTorch (bias-aware)."""
    views = layout.split(module)
    act = layout.activation_fn(getattr(module, "act_fn", None))

    def run(x: torch.Tensor, e: int) -> torch.Tensor:
        gate, up = x @ views["gate"][e].mT, x @ views["up"][e].mT  # (n, F)
        if layout.has_bias:
            bg, bu = layout.split_bias(views["bias_gate_up"][e])
            gate, up = gate + bg, up + bu
        out = act(gate, up) @ views["down"][e].mT  # (n, H)
        return out + views["bias_down"][e] if layout.has_bias else out

    return run


class _StatsHook:
    """Forward pre-hook on an experts module accumulating counts, REAP sums and mean outputs."""

    def __init__(self, module, layout, mean_tokens: int, seed: int):
        e, h = module.num_experts, layout.split(module)["down"].shape[1]
        self.counts = torch.zeros(e, dtype=torch.float64)
        self.reap_sum = torch.zeros(e, dtype=torch.float64)
        self.out_sum = torch.zeros(e, h, dtype=torch.float64)
        self.out_n = 0
        self.mean_tokens, self.gen = mean_tokens, torch.Generator().manual_seed(seed)
        self.run = _expert_fn(module, layout)

    @torch.no_grad()
    def __call__(self, module, args, kwargs):
        vals = list(args) + [kwargs.get(n) for n in ("hidden_states", "top_k_index", "top_k_weights")[len(args):]]
        x, idx, w = vals[0].reshape(-1, vals[0].shape[-1]), vals[1], vals[2]
        take = min(x.shape[0], self.mean_tokens - self.out_n)
        sample = x[torch.randperm(x.shape[0], generator=self.gen)[:take]] if take > 0 else None
        for e in range(self.counts.numel()):
            tok, slot = torch.nonzero(idx == e, as_tuple=True)
            if tok.numel():
                norms = self.run(x[tok], e).norm(dim=-1).double()  # (n_e,)
                self.reap_sum[e] += (w[tok, slot].double() * norms).sum()
                self.counts[e] += tok.numel()
            if sample is not None:
                self.out_sum[e] += self.run(sample, e).double().sum(0)
        self.out_n += max(take, 0)


@torch.no_grad()
def collect_expert_stats(model, seqs: list[torch.Tensor], mean_tokens: int = 4096, seed: int = 0) -> dict:
    """Run ``model`` on calibration sequences; per experts path return ``counts (E,)``,
    ``reap (E,)`` (mean gate weight x output norm over routed tokens; 0 if never routed)
    and ``mean_out (E, H)`` (mean output over up to ``mean_tokens`` tokens of the layer)."""
    hooks = {p: _StatsHook(m, lay, mean_tokens, seed + i) for i, (p, m, lay) in enumerate(experts_of(model))}
    handles = [model.get_submodule(p).register_forward_pre_hook(h, with_kwargs=True) for p, h in hooks.items()]
    try:
        for s in seqs:
            model(input_ids=s[None], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {p: {"counts": h.counts, "reap": h.reap_sum / h.counts.clamp_min(1),
                "mean_out": h.out_sum / max(h.out_n, 1)} for p, h in hooks.items()}


def router_of(model, path: str, num_experts: int) -> nn.Module:
    """The router next to the experts module at ``path``: a sibling with an ``(E, H)`` weight."""
    parent = model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else model
    for name, child in parent.named_children():
        w = getattr(child, "weight", None)
        if name != path.rsplit(".", 1)[-1] and isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[0] == num_experts:
            return child
    raise RuntimeError(f"no router (weight of shape (E={num_experts}, H)) next to {path}")


class _MaskLogits(TorchFunctionMode):
    """Adds -inf to the columns of pruned experts of ``F.linear(·, router_weight)``."""

    def __init__(self, weight: torch.Tensor, pruned: torch.Tensor):
        super().__init__()
        self.weight, self.pruned = weight, pruned

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is F.linear and len(args) > 1 and args[1] is self.weight:
            out = out.masked_fill(self.pruned.to(out.device), float("-inf"))
        return out


def mask_router(router: nn.Module, pruned: torch.Tensor) -> None:
    """Make ``router`` (its own forward, unchanged) ignore experts where ``pruned`` is True."""
    if isinstance(router, nn.Linear):
        router.register_forward_hook(lambda m, a, out: out.masked_fill(pruned, float("-inf")))
        return
    inner = router.forward

    def forward(*args, **kwargs):
        with _MaskLogits(router.weight, pruned):
            return inner(*args, **kwargs)

    router.forward = forward


@torch.no_grad()
def prune_experts(model, stats: dict, keep_fraction: float) -> tuple[int, dict]:
    """REAP-like pruning: keep ``max(1, floor(keep_fraction·E))`` experts with the highest
    score per layer.  Returns (stored expert bytes at bf16 = kept x per-expert params x 2,
    ``{path: kept expert ids}``).  Router weights (E x H, not expert bytes) are not counted."""
    total, kept_ids = 0, {}
    for path, module, _layout in experts_of(model):
        e = module.num_experts
        n_keep = max(1, int(keep_fraction * e + 1e-9))
        keep = torch.topk(stats[path]["reap"], n_keep).indices.sort().values
        pruned = torch.ones(e, dtype=torch.bool)
        pruned[keep] = False
        for p in module.parameters():
            if p.shape[0] == e:
                p[pruned] = 0
        mask_router(router_of(model, path, e), pruned)
        kept_ids[path] = keep.tolist()
        total += n_keep * per_expert_params(module) * BF16_BYTES
    return total, kept_ids


def _average_linkage(feats: torch.Tensor, n_clusters: int) -> list[int]:
    """Agglomerative clustering (average linkage, cosine distance) -> cluster label per row."""
    from scipy.cluster.hierarchy import fcluster, linkage

    if n_clusters >= feats.shape[0]:
        return list(range(feats.shape[0]))
    z = linkage(feats.double().numpy(), method="average", metric="cosine")
    return [int(c) - 1 for c in fcluster(z, t=n_clusters, criterion="maxclust")]


@torch.no_grad()
def merge_experts(model, stats: dict, keep_fraction: float) -> tuple[int, dict]:
    """HC-SMoE-like merging into ``max(1, floor(keep_fraction·E))`` clusters per layer.
    Returns (stored expert bytes at bf16 = clusters x per-expert params x 2,
    ``{path: cluster label per expert}``); the E-entry router->cluster map is not counted."""
    total, labels_out = 0, {}
    for path, module, _layout in experts_of(model):
        e = module.num_experts
        n = max(1, int(keep_fraction * e + 1e-9))
        labels = _average_linkage(stats[path]["mean_out"], n)
        freq = stats[path]["counts"]
        for c in sorted(set(labels)):
            members = torch.tensor([i for i, lab in enumerate(labels) if lab == c])
            wts = freq[members]
            wts = wts / wts.sum() if wts.sum() > 0 else torch.full_like(wts, 1 / len(members))
            for p in module.parameters():
                if p.shape[0] == e:
                    merged = (p[members].double() * wts.view(-1, *([1] * (p.dim() - 1)))).sum(0)
                    p[members] = merged.to(p.dtype)
        labels_out[path] = labels
        total += len(set(labels)) * per_expert_params(module) * BF16_BYTES
    return total, labels_out


def rtn_bytes(numel: int, bits: int, group: int) -> int:
    """Stored bytes of RTN codes + per-group bf16 scale + b-bit integer zero point."""
    groups = numel // group
    return (numel * bits + groups * (16 + bits) + 7) // 8


def _rtn_groups(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, str]:
    """RTN of ``w (N, group)`` row-wise (asymmetric, integer zero point, bf16 scale)."""
    qmax = 2 ** bits - 1
    try:
        from torchao.quantization.quant_primitives import (
            MappingType, choose_qparams_affine, dequantize_affine, quantize_affine)

        bs = (1, w.shape[1])
        s, z = choose_qparams_affine(w, MappingType.ASYMMETRIC, bs, torch.uint8, quant_min=0, quant_max=qmax,
                                     scale_dtype=torch.bfloat16)
        q = quantize_affine(w, bs, s, z, torch.uint8, quant_min=0, quant_max=qmax)
        assert int(z.min()) >= 0 and int(z.max()) <= qmax, "zero point outside the b-bit range"
        return dequantize_affine(q, bs, s, z, torch.uint8, quant_min=0, quant_max=qmax, output_dtype=w.dtype), "torchao"
    except ImportError:
        lo, hi = w.amin(1, keepdim=True).clamp(max=0), w.amax(1, keepdim=True).clamp(min=0)
        s = ((hi - lo) / qmax).clamp_min(1e-12).bfloat16().float()
        z = torch.clamp(torch.round(-lo / s), 0, qmax)
        q = torch.clamp(torch.round(w / s) + z, 0, qmax)
        return (q - z) * s, "builtin"


@torch.no_grad()
def rtn_quantize(model, bits: int, group: int = 64) -> tuple[int, str]:
    """Quantize every expert projection ``(E, d_out, d_in)`` in groups of ``group``
    consecutive weights along d_in (row-major, so groups span rows when d_in is not a
    multiple of ``group``); returns (stored bytes by :func:`rtn_bytes`, backend name)."""
    total, backend = 0, "none"
    for _path, module, layout in experts_of(model):
        for p, view in layout.split(module).items():
            if p.startswith("bias"):
                total += view.numel() * BF16_BYTES
                continue
            w = view.detach().float().contiguous()
            if w.numel() % group:
                raise ValueError(f"{p}: {w.numel()} weights are not a multiple of group {group}")
            deq, backend = _rtn_groups(w.reshape(-1, group), bits)
            view.copy_(deq.reshape(w.shape).to(view.dtype))
            total += rtn_bytes(w.numel(), bits, group)
    return total, backend


@torch.no_grad()
def hqq_quantize(model, bits: int, group: int = 64) -> tuple[int, str]:
    """HQQ every expert projection (groups of ``group`` along d_in, row-major as
    :func:`rtn_quantize`) through the ``hqq`` library; returns (stored bytes of the packed
    codes + float16 scale + float16 zero point per group, i.e. what moecore stores, "hqq")."""
    from moecore.quant import dequantize, quantize

    total = 0
    for _path, module, layout in experts_of(model):
        for p, view in layout.split(module).items():
            if p.startswith("bias"):
                total += view.numel() * BF16_BYTES
                continue
            q = quantize(view.detach(), bits, group, "hqq", "core")
            view.copy_(dequantize(q, tuple(view.shape), bits, "core", view.dtype))
            total += sum(t.numel() * t.element_size() for t in q.values())
    return total, "hqq"


# --- MoBE (Mixture of Basis Experts, arXiv 2508.05257; the authors' inclusionAI/MoBE train.py) ----------------
# Each expert's weight, oriented (R, C) = (F, H) like the paper's gate/up, is
#     W_e ≈ A_e · act(Σ_j softmax(α_e)_j · B_j),   A_e (R, k) per expert, B_j (k, C) shared by the layer's experts,
# fitted by Adam on the plain weight MSE (no activations), the target scaled by its global std,
# initialised as train.py does: the experts in m consecutive groups, group j's stacked rows
# SVD'd, B_j = its top-k right singular vectors, A_e = its rows of U_k S_k, α_e = one-hot(j).
# Deviations, all stated: A's init is divided by the std (train.py compares an unscaled init
# to the scaled target; Adam absorbs it either way), the best state is checked every
# `check` steps as train.py does every 200, and at budgets below the paper's (which keeps
# down_proj dense) down_proj is fitted the same way, transposed to (F, H).
MOBE_ACTIVATIONS = {"silu": F.silu, "tanh": torch.tanh}


def mobe_rank(budget: float, e: int, r: int, c: int, m: int) -> int:
    """Largest k with ``E·R·k + m·k·C + E·m <= budget·E·R·C`` (A's, the bases', the mixing logits)."""
    return int((budget * e * r * c - e * m) // (e * r + m * c))


def _mobe_init(w: torch.Tensor, m: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """train.py's init for ``w (E, R, C)``: per group of experts an SVD of its stacked rows."""
    e, r, c = w.shape
    a, bases, logits = torch.empty(e, r, k), torch.zeros(m, k, c), torch.zeros(e, m)
    for j, members in enumerate(torch.arange(e).tensor_split(m)):
        u, s, vt = torch.linalg.svd(w[members].reshape(-1, c), full_matrices=False)  # (g·R, min) (min,) (min, C)
        kk = min(k, s.numel())
        bases[j, :kk] = vt[:kk]
        a[members] = torch.nn.functional.pad(u[:, :kk] * s[:kk], (0, k - kk)).reshape(len(members), r, k)
        logits[members, j] = 1.0
    return a, bases, logits


def mobe_reconstruct(a: torch.Tensor, bases: torch.Tensor, logits: torch.Tensor, activation: str) -> torch.Tensor:
    """``A (E,R,k) · act(softmax(α) (E,m) · B (m,k,C))`` -> ``(E, R, C)``."""
    mixed = torch.einsum("em,mkc->ekc", logits.softmax(dim=1), bases)  # (E, k, C)
    return a @ MOBE_ACTIVATIONS[activation](mixed)


def fit_mobe(w: torch.Tensor, n_bases: int, k: int, steps: int = 2000, lr: float = 0.07,
             activation: str = "silu", check: int = 50) -> dict:
    """Fit MoBE to ``w (E, R, C)`` (float32 maths). Returns the best ``a (E,R,k)``, ``bases
    (m,k,C)``, ``logits (E,m)``, the reconstruction ``w_hat`` (unscaled), its relative
    Frobenius error ``rel_err`` and the scaled MSE every ``check`` steps (``history``)."""
    w = w.detach().float()
    std = w.std()
    target = w / std
    a, bases, logits = (torch.nn.Parameter(t) for t in _mobe_init(w, n_bases, k))
    with torch.no_grad():
        a /= std
    opt = torch.optim.Adam([a, bases, logits], lr=lr)
    best, history = (float("inf"), None), []
    for step in range(steps + 1):
        loss = F.mse_loss(mobe_reconstruct(a, bases, logits, activation), target)
        if step % check == 0 or step == steps:
            history.append((step, loss.item()))
            if loss.item() < best[0]:
                best = (loss.item(), [t.detach().clone() for t in (a, bases, logits)])
        if step == steps:
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    a_, b_, l_ = best[1]
    with torch.no_grad():
        w_hat = mobe_reconstruct(a_, b_, l_, activation) * std
    return {"a": a_, "bases": b_, "logits": l_, "w_hat": w_hat, "history": history,
            "rel_err": float((w_hat - w).norm() / w.norm())}


@torch.no_grad()
def mobe_compress(model, budget: float, gate_up_only: bool = False, experts_per_basis: int = 4,
                  steps: int = 2000, lr: float = 0.07, activation: str = "silu") -> tuple[int, dict]:
    """MoBE every experts module at ``budget`` of its bf16 expert parameters, weights replaced
    by their reconstructions. ``m = ceil(E / experts_per_basis)`` bases per projection (the
    paper's 4 experts per basis: 256/64 on DeepSeek-V3, 128/32 on Qwen3), ``k`` from
    :func:`mobe_rank`. ``gate_up_only``: the paper's choice, down_proj kept dense, so gate and
    up share what is left, ``(3·budget - 1) / 2`` each; below a third it raises ``ConfigError``.
    Returns (stored bytes at bf16: A, bases, logits, dense down_proj, biases;
    ``{path: {proj: {"k", "m", "rel_err", "history"}}}``)."""
    per_proj = (3 * budget - 1) / 2 if gate_up_only else budget
    if per_proj <= 0:
        raise ConfigError(f"MoBE with down_proj dense (the paper's setting) keeps at least 1/3 of the expert "
                         f"parameters; budget {budget} is below it")
    total, info = 0, {}
    for path, module, layout in experts_of(model):
        info[path] = {}
        for p, view in layout.split(module).items():
            if p.startswith("bias") or (gate_up_only and p == "down"):
                total += view.numel() * BF16_BYTES
                continue
            w = view.mT if p == "down" else view  # (E, F, H): the expert-specific factor on the F side
            e, r, c = w.shape
            m = -(-e // experts_per_basis)
            k = mobe_rank(per_proj, e, r, c, m)
            if k < 1:
                raise ConfigError(f"{path}.{p}: budget {budget} leaves no rank for MoBE with {m} bases")
            with torch.enable_grad():
                fit = fit_mobe(w, m, k, steps=steps, lr=lr, activation=activation)
            w.copy_(fit["w_hat"].to(w.dtype))
            total += (e * r * k + m * k * c + e * m) * BF16_BYTES
            info[path][p] = {"k": k, "m": m, "rel_err": fit["rel_err"], "history": fit["history"]}
    return total, info
