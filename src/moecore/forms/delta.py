"""Delta form: ``W_i = C + A_i B_iᵀ``, the core applied once per token.

Stored factors of projection ``p`` (``d_out, d_in`` its shape, ``s`` its rank):
``delta_a_{p} (E, d_out, s)``, ``delta_b_{p} (E, d_in, s)``.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch

from .. import grouped
from ..maths import decompose, fit
from .base import FitResult, Form

Tensor = torch.Tensor


class DeltaForm(Form):
    """``W_i = C + A_i B_iᵀ``: one rank unit is one column of ``A_i`` and of ``B_i``
    (``d_out + d_in`` parameters per expert); the forward runs each core once per token plus
    ``k`` low-rank paths."""

    name = "delta"
    factor_names = ("delta_a", "delta_b")
    quantizable = True
    svd_units_per_rank = 1

    def factor_shapes(self, num_experts: int, d_out: int, d_in: int, rank: int) -> tuple[tuple[int, ...], ...]:
        """``A (E, d_out, s)``, ``B (E, d_in, s)``."""
        return (num_experts, d_out, rank), (num_experts, d_in, rank)

    def rank_unit_params(self, d_out: int, d_in: int) -> int:
        """``d_out + d_in`` (one column of ``A_i`` and of ``B_i``)."""
        return d_out + d_in

    def core_runs_per_token(self, top_k: int) -> int:
        """1: the core is applied to each token once, whatever its experts."""
        return 1

    def fit(self, weights: Tensor, core: Tensor, rank: int, L: Tensor | None, S: Tensor | None, *, steps: int,
            method: str, generator: torch.Generator | None, chunk: int, device: torch.device,
            f64_factor_limit: int) -> FitResult:
        """Block-coordinate descent of core and factors (:func:`moecore.maths.fit.fit_delta`);
        factor stacks over ``f64_factor_limit`` float64 bytes are kept in float32 between
        steps, and on an accelerator the best iterate is kept in host memory."""
        e, d_out, d_in = weights.shape
        big = e * (d_out + d_in) * rank * 8 > f64_factor_limit
        core, factors, history = fit.fit_delta(
            weights, core, rank, L, S, steps=steps, method=method, generator=generator, chunk=chunk, device=device,
            factor_dtype=torch.float32 if big or method == "randomized" else torch.float64,
            best_on="cpu" if device.type != "cpu" else None, compute_dtype=fit.compute_dtype(method))
        return FitResult(core, factors, history, refine_iters=len(history) - 1)

    def reconstruct(self, core: Tensor, factors: tuple[Tensor, ...]) -> Tensor:
        """``C + A_i B_iᵀ``: ``(d_out, d_in), ((E, d_out, s), (E, d_in, s)) -> (E, d_out, d_in)``."""
        a, b = factors
        return decompose.reconstruct_delta(core, a, b)

    def fused_operands(self, get: Callable[[str], Tensor], ranks: Mapping[str, int]) -> dict[str, Tensor]:
        """:func:`moecore.grouped.delta_operands`."""
        return grouped.delta_operands(get, ranks)

    def forward(self, x: Tensor, route: grouped.Routing, ops: dict[str, Tensor], act: grouped.Activation,
                bias_gu: tuple[Tensor, Tensor] | None = None, bias_down: Tensor | None = None) -> Tensor:
        """:func:`moecore.grouped.delta_forward`: ``(T, H) -> (T, H)``."""
        return grouped.delta_forward(x, route, ops, act, bias_gu, bias_down)


FORM = DeltaForm()
