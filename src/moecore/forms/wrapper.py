"""Wrapper form: ``W_i = (I + U_out V_outᵀ) C (I + U_in V_inᵀ)``, the core applied once per
routed pair.

Stored factors of projection ``p`` (``d_out, d_in`` its shape, ``r`` its rank per side):
``wrap_u_in_{p} (E, d_in, r)``, ``wrap_v_in_{p} (E, d_in, r)``, ``wrap_u_out_{p} (E, d_out, r)``,
``wrap_v_out_{p} (E, d_out, r)``.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch

from .. import grouped
from ..maths import decompose, fit
from .base import FitResult, Form

Tensor = torch.Tensor


class WrapperForm(Form):
    """``W_i = (I + U_out V_outᵀ) C (I + U_in V_inᵀ)``: one rank unit is one column of each of
    the four factors (``2(d_out + d_in)`` parameters per expert, twice the delta's); the
    forward runs the core once per routed pair."""

    name = "wrapper"
    factor_names = ("wrap_u_in", "wrap_v_in", "wrap_u_out", "wrap_v_out")
    quantizable = False  # the factors multiply the core: no (A, B) pairs to quantize and refit
    svd_units_per_rank = 2

    def factor_shapes(self, num_experts: int, d_out: int, d_in: int, rank: int) -> tuple[tuple[int, ...], ...]:
        """``U_in, V_in (E, d_in, r)``, ``U_out, V_out (E, d_out, r)``."""
        return (num_experts, d_in, rank), (num_experts, d_in, rank), (num_experts, d_out, rank), \
            (num_experts, d_out, rank)

    def rank_unit_params(self, d_out: int, d_in: int) -> int:
        """``2(d_out + d_in)`` (one column of each of the four factors)."""
        return 2 * (d_out + d_in)

    def core_runs_per_token(self, top_k: int) -> int:
        """``top_k``: the core is applied to every routed pair's wrapped input."""
        return top_k

    def fit(self, weights: Tensor, core: Tensor, rank: int, L: Tensor | None, S: Tensor | None, *, steps: int,
            method: str, generator: torch.Generator | None, chunk: int, device: torch.device,
            f64_factor_limit: int) -> FitResult:
        """ALS of the factors for the given core (:func:`moecore.maths.fit.fit_wrapper`; the
        core is not refined, ``S``/``method``/``generator``/``f64_factor_limit`` are unused)."""
        factors, history = fit.fit_wrapper(weights, core, rank, L, steps=steps, chunk=chunk, device=device)
        return FitResult(core.to(device=device, dtype=torch.float64), factors, history, refine_iters=len(history))

    def reconstruct(self, core: Tensor, factors: tuple[Tensor, ...]) -> Tensor:
        """``(I + U_o V_oᵀ) C (I + U_i V_iᵀ)``: ``(d_out, d_in)`` and the four factors ``-> (E, d_out, d_in)``."""
        u_in, v_in, u_out, v_out = factors
        return decompose.reconstruct_wrapper(core, u_in, v_in, u_out, v_out)

    def fused_operands(self, get: Callable[[str], Tensor], ranks: Mapping[str, int]) -> dict[str, Tensor]:
        """:func:`moecore.grouped.wrapper_operands`."""
        return grouped.wrapper_operands(get, ranks)

    def forward(self, x: Tensor, route: grouped.Routing, ops: dict[str, Tensor], act: grouped.Activation,
                bias_gu: tuple[Tensor, Tensor] | None = None, bias_down: Tensor | None = None) -> Tensor:
        """:func:`moecore.grouped.wrapper_forward`: ``(T, H) -> (T, H)``."""
        return grouped.wrapper_forward(x, route, ops, act, bias_gu, bias_down)


FORM = WrapperForm()
