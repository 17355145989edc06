"""Structure of a (bundled or user) MoE model: parameter counts, expert similarity,
router load and residual spectra. Used by model cards and benchmarks; reads the original
experts modules found by :func:`moecore.families.find_experts`, per projection in
``(E, d_out, d_in)`` convention whatever the family's layout."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .families import find_experts

_PROJECTIONS = ("gate", "up", "down")


def param_counts(model, stored_dtype: torch.dtype | None = None) -> dict[str, int]:
    """Total / expert parameter counts (real tensors) and bytes, at ``stored_dtype`` when the
    model was loaded in another dtype than it is stored in (e.g. bf16 checkpoint run in fp32)."""
    def nbytes_of(p):
        return p.numel() * (torch.empty(0, dtype=stored_dtype).element_size() if stored_dtype else p.element_size())
    expert_names = tuple(path + "." for path, _, _ in find_experts(model, "all", required=False))
    named = list(model.named_parameters())
    total = sum(p.numel() for _, p in named)
    nbytes = sum(nbytes_of(p) for _, p in named)
    expert = sum(p.numel() for n, p in named if n.startswith(expert_names))
    expert_bytes = sum(nbytes_of(p) for n, p in named if n.startswith(expert_names))
    return {"params_total": total, "params_experts": expert, "bytes_total": nbytes, "bytes_experts": expert_bytes}


def _expert_matrix(views: dict[str, torch.Tensor]) -> torch.Tensor:
    """(E, D): each expert's weights flattened (gate, up and down together)."""
    e = views["gate"].shape[0]
    return torch.cat([views[p].reshape(e, -1) for p in _PROJECTIONS], 1).float()


def expert_cosine(model) -> list[float]:
    """Mean pairwise cosine similarity of the experts, per MoE layer."""
    out = []
    for _, mod, layout in find_experts(model):
        w = F.normalize(_expert_matrix(layout.split(mod)), dim=1)  # (E, D)
        sim = w @ w.T
        e = sim.shape[0]
        out.append(((sim.sum() - sim.diagonal().sum()) / (e * (e - 1))).item())
    return out


def residual_profile(model, rank_fraction: float = 0.25) -> list[dict]:
    """Per layer: ||W - C|| / ||W|| with C the experts' mean, and the share of the residual's
    energy captured by its top singular values at ``rank_fraction`` of full rank (per projection,
    averaged over experts). A random matrix captures about ``rank_fraction``-ish; shared
    low-rank structure captures much more."""
    out = []
    for _, mod, layout in find_experts(model):
        views = layout.split(mod)
        w = _expert_matrix(views)
        rel = ((w - w.mean(0)).norm() / w.norm()).item()
        energies = []
        for mats in (views[p].float() for p in _PROJECTIONS):  # (E, d_out, d_in)
            res = mats - mats.mean(0, keepdim=True)
            s = torch.linalg.svdvals(res) ** 2  # (E, min(d_out, d_in))
            r = max(1, int(round(rank_fraction * s.shape[1])))
            energies.append((s[:, :r].sum(1) / s.sum(1)).mean().item())
        out.append({"rel_residual": rel, f"energy_at_{rank_fraction:g}_rank": sum(energies) / 3})
    return out


@torch.no_grad()
def router_load(model, stream: torch.Tensor, seq_len: int = 256, max_tokens: int = 32768) -> list[list[float]]:
    """Fraction of top-k assignments that each expert receives, per MoE layer, on ``stream``."""
    k = model.config.num_experts_per_tok
    ids = stream[: (min(len(stream), max_tokens) // seq_len) * seq_len].view(-1, seq_len)
    counts = None
    for chunk in ids.split(8):
        logits = model(input_ids=chunk, output_router_logits=True).router_logits  # tuple of (T, E)
        top = [lg.float().topk(k, dim=-1).indices for lg in logits]
        c = torch.stack([torch.bincount(t.flatten(), minlength=lg.shape[-1]) for t, lg in zip(top, logits)])
        counts = c if counts is None else counts + c
    return (counts.double() / counts.sum(1, keepdim=True)).tolist()
