"""Ragged form: ``W_i = C + A_i B_iᵀ`` with a rank ``r_i`` of its own for every expert.

The delta form's maths with the rank budget spent unevenly: at equal stored parameters, a
projection's ``E·s`` rank units go to the experts whose (routing-weighted, whitened) residual
they reduce most, the water-filling of the residual spectra (:func:`moecore.maths.fit.fit_delta`
with ``rank_cap``), re-chosen at every refinement step.  ``s`` (the projection's ``rank``) is
the MEAN rank, so every count (parameters, budget, plan) is the delta form's; no expert gets
more than ``expert_rank_cap · s``.

Stored tensors of projection ``p`` (``d_out, d_in`` its shape, ``R = E·s``): the factors of
all experts side by side, expert by expert along the rank axis,
``ragged_a_{p} (d_out, R)`` and ``ragged_b_{p} (d_in, R)``, and ``ragged_r_{p} (E,)`` int32,
each expert's rank (summing to ``R``).

Forward: the delta form's (:class:`~moecore.forms.delta.DeltaForm`), on operands padded to the
largest expert rank of the projection (a gather, built once and cached in inference; built per
call with gradients): the grouped GEMMs take one ``K`` for all groups, so memory and
multiply-adds of the low-rank paths are those of the largest rank, not of the mean (what that
costs is measured in benchmarks/RESULTS.md).  Reading that largest rank is one host read of
``ragged_r`` per operand build.  Quantized storage: the core and the side-by-side factors in
groups down each column (:mod:`moecore.quant`), the factors quantized as fitted (no refit to
the quantized core, no re-solve: :meth:`refit_factors` / :meth:`quantize_factors` are the
base's), the ranks stored as they are.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch

from ..errors import ConfigError
from ..maths import decompose
from .base import FitResult, Form
from .delta import FORM as DELTA
from .delta import DeltaForm

Tensor = torch.Tensor


class RaggedForm(DeltaForm):
    """``W_i = C + A_i B_iᵀ``, ``A_i (d_out, r_i)``, ``B_i (d_in, r_i)``, ``Σ r_i = E·s``."""

    name = "ragged"
    factor_names = ("ragged_a", "ragged_b")
    index_names = ("ragged_r",)
    counts_note = ("ragged form: multiply-adds are counted at each projection's mean rank; the grouped forward "
                   "pads every expert's low-rank path to the projection's largest rank (at most expert_rank_cap "
                   "times the mean), so it executes up to that many more low-rank multiply-adds")
    quantizable = True

    def factor_shapes(self, num_experts: int, d_out: int, d_in: int, rank: int) -> tuple[tuple[int, ...], ...]:
        """``A (d_out, E·s)``, ``B (d_in, E·s)``: every expert's columns side by side."""
        return (d_out, num_experts * rank), (d_in, num_experts * rank)

    def svd_width(self, rank: int, expert_rank_cap: float = 2.0) -> int:
        """Each expert's SVD keeps up to the cap, ``expert_rank_cap · rank`` columns."""
        return max(rank, int(expert_rank_cap * rank))

    def fit(self, weights: Tensor, core: Tensor, rank: int, L: Tensor | None, K: Tensor | None, *, steps: int,
            method: str, generator: torch.Generator | None, chunk: int, device: torch.device,
            f64_factor_limit: int, expert_rank_cap: float = 2.0) -> FitResult:
        """:func:`moecore.maths.fit.fit_delta` with per-expert ranks (water-filled, at most
        ``expert_rank_cap · rank`` each); factors ``(A (E, d_out, c), B (E, d_in, c), ranks (E,))``,
        ``c`` the cap, the columns past each expert's rank zero."""
        e, d_out, d_in = weights.shape
        if rank > min(d_out, d_in):
            raise ConfigError(f"form 'ragged': rank {rank} is above the full rank {min(d_out, d_in)}")
        return self._fit_delta(weights, core, rank, L, K, steps=steps, method=method, generator=generator,
                               chunk=chunk, device=device, f64_factor_limit=f64_factor_limit,
                               rank_cap=self.svd_width(rank, expert_rank_cap))

    def to_stored(self, num_experts: int, factors: tuple[Tensor, ...],
                  dtype: torch.dtype | None = None) -> tuple[int, tuple[Tensor, ...]]:
        """Fitted ``(A (E, d_out, c), B (E, d_in, c), ranks (E,))`` -> ``(s, (A (d_out, R), B (d_in, R), ranks))``,
        in ``dtype`` if given.  Each compact factor is written expert by expert into its output,
        so the only allocation beside the padded stacks is the stored tensors (at DeepSeek-V3's
        shape a padded float32 stack cast whole was 3.7 GB more)."""
        a, b, ranks = factors
        total = int(ranks.sum())
        if total % num_experts:
            raise ValueError(f"ragged factors hold {total} rank units, not a multiple of {num_experts} experts")
        return total // num_experts, (self._compact(a, ranks, total, dtype), self._compact(b, ranks, total, dtype),
                                      ranks.to(torch.int32))

    @staticmethod
    def _compact(padded: Tensor, ranks: Tensor, total: int, dtype: torch.dtype | None) -> Tensor:
        """``(E, d, c)`` padded -> ``(d, R)``: expert ``i``'s first ``ranks[i]`` columns side by side."""
        out = padded.new_empty(padded.shape[1], total, dtype=dtype or padded.dtype)  # (d, R)
        start = 0
        for i, r in enumerate(ranks.tolist()):
            out[:, start:start + r] = padded[i, :, :r]
            start += r
        return out

    def check_index(self, get: Callable[[str], Tensor], p: str, num_experts: int, rank: int) -> str | None:
        """``ragged_r_{p}``: integers, none negative, summing to ``E·s``."""
        r = get(f"ragged_r_{p}")
        if r.is_floating_point() or r.shape != (num_experts,):
            return f"ragged_r_{p} must be {num_experts} integers, got {tuple(r.shape)} {r.dtype}"
        if r.device.type != "meta" and (bool((r < 0).any()) or int(r.sum()) != num_experts * rank):
            return f"ragged_r_{p} must be non-negative ranks summing to {num_experts * rank}"
        return None

    def refit_factors(self, weights: Tensor, core: Tensor, rank: int, L: Tensor | None, K: Tensor | None, *,
                      chunk: int | None = None, device=None, method: str = "exact") -> tuple[Tensor, ...] | None:
        """``None``: quantized storage keeps the float fit's factors (the delta form's refit is uniform-rank)."""
        return None

    def quantize_factors(self, factors: tuple[Tensor, ...], quantize: Callable[[int, Tensor], Tensor], *,
                         residual: Callable[[slice], Tensor] | None = None, resolve: bool = True,
                         chunk: int | None = None) -> tuple[Tensor, ...]:
        """Each side-by-side factor quantized as it is (the base's; no per-expert re-solve)."""
        return Form.quantize_factors(self, factors, quantize)

    @staticmethod
    def _padded(compact: Tensor, ranks: Tensor, width: int) -> Tensor:
        """``(d, R)`` columns, expert by expert, -> ``(E, d, width)`` with zero columns past
        each expert's rank (a gather: differentiable, gradients reach ``compact``)."""
        r = ranks.to(device=compact.device, dtype=torch.long)  # (E,)
        start = torch.cumsum(r, 0) - r  # (E,)
        j = torch.arange(width, device=compact.device)
        idx = torch.where(j < r[:, None], start[:, None] + j, compact.shape[1])  # (E, width); R = a zero column
        ext = torch.cat([compact, compact.new_zeros(compact.shape[0], 1)], 1)  # (d, R + 1)
        return ext[:, idx].permute(1, 0, 2)  # (E, d, width)

    #: trained as the delta form on the factors padded to the largest expert rank: the forward
    #: runs on those padded operands anyway, and the columns past an expert's rank, zero in both
    #: ``A`` and ``B``, get exactly zero gradients, so Adam keeps them zero and the trained
    #: values are those of training the compact factors, without a gather and its scatter-back
    #: per step (at Qwen3-30B-A3B's shape they took most of each step: benchmarks/RESULTS.md)
    training_form = "delta"

    def to_training(self, get: Callable[[str], Tensor], p: str) -> tuple[Tensor, ...]:
        """``(A (E, d_out, m), B (E, d_in, m))``, ``m`` the largest expert rank of ``p``."""
        r = get(f"ragged_r_{p}")
        width = int(r.max()) if r.numel() else 0
        return tuple(self._padded(get(n), r, width) for n in self.param_names(p))

    def from_training(self, get: Callable[[str], Tensor], p: str, factors: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """Padded ``(A, B)`` back to the compact side-by-side factors (:meth:`to_stored`)."""
        return self.to_stored(factors[0].shape[0], (*factors, get(f"ragged_r_{p}")))[1][:2]

    @staticmethod
    def _columns(get: Callable[[str], Tensor], p: str, a: int, b: int) -> tuple[Tensor, int, int]:
        """Experts ``a:b``'s ranks ``(b−a,)`` and their columns ``start:end`` of the side-by-side factors."""
        r = get(f"ragged_r_{p}")
        start = int(r[:a].sum())
        return r[a:b], start, start + int(r[a:b].sum())

    def training_slice(self, get: Callable[[str], Tensor], p: str, a: int, b: int) -> tuple[Tensor, ...]:
        """Experts ``a:b`` padded to the largest of THEIR ranks: ``(A (b−a, d_out, m), B (b−a, d_in, m))``."""
        r, start, end = self._columns(get, p, a, b)
        return self.to_training(lambda n: r if n == f"ragged_r_{p}" else get(n)[:, start:end], p)

    def set_training_slice(self, get: Callable[[str], Tensor], p: str, a: int, b: int,
                           factors: tuple[Tensor, ...]) -> None:
        """Padded experts ``a:b`` back into their columns of the side-by-side factors."""
        r, start, end = self._columns(get, p, a, b)
        keep = torch.arange(factors[0].shape[-1], device=r.device) < r.long()[:, None]  # (b−a, m)
        for n, t in zip(self.param_names(p), factors):
            get(n)[:, start:end].copy_(t.permute(1, 0, 2)[:, keep.to(t.device)])

    def reconstruct(self, core: Tensor, factors: tuple[Tensor, ...]) -> Tensor:
        """``C + A_i B_iᵀ`` ``(E, d_out, d_in)`` from fitted (padded, 3-D) or stored (compact) factors."""
        a, b, ranks = factors
        if a.dim() == 2:
            width = int(ranks.max()) if ranks.numel() else 0
            a, b = self._padded(a, ranks, width), self._padded(b, ranks, width)
        return decompose.reconstruct_delta(core, a, b)

    def fused_operands(self, get: Callable[[str], Tensor], ranks: Mapping[str, int]) -> dict[str, Tensor]:
        """The delta form's operands (:meth:`DeltaForm.fused_operands`) on the factors padded
        to each projection's largest expert rank."""
        padded, widths = {}, {}
        for p in ("gate", "up", "down"):
            r = get(f"ragged_r_{p}")
            widths[p] = int(r.max()) if r.numel() else 0
            for stem, delta in zip(self.factor_names, DELTA.factor_names):
                padded[f"{delta}_{p}"] = self._padded(get(f"{stem}_{p}"), r, widths[p])
        return DELTA.fused_operands(lambda n: padded[n] if n in padded else get(n), widths)


FORM = RaggedForm()
