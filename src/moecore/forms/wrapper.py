"""Wrapper form: ``W_i = (I + U_out V_outᵀ) C (I + U_in V_inᵀ)``, the core applied once per
routed pair.

Stored factors of projection ``p`` (``d_out, d_in`` its shape, ``r`` its rank per side):
``wrap_u_in_{p} (E, d_in, r)``, ``wrap_v_in_{p} (E, d_in, r)``, ``wrap_u_out_{p} (E, d_out, r)``,
``wrap_v_out_{p} (E, d_out, r)``.

Forward (:meth:`WrapperForm.forward`): per routed pair, the input wrapped, the core, the output
wrapped, each low-rank wrap two grouped GEMMs.  Quantized storage: core and factors quantized
as fitted (:meth:`~moecore.forms.base.Form.quantize_factors`'s default; the factors are not refit).
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch

from ..grouped import Activation, Routing, cpu_layout, gate_up_bias, grouped_linear, pad_rank, padded_ranks
from ..maths import decompose, fit
from .base import FitResult, Form

Tensor = torch.Tensor


class WrapperForm(Form):
    """``W_i = (I + U_out V_outᵀ) C (I + U_in V_inᵀ)``: one rank unit is one column of each of
    the four factors (``2(d_out + d_in)`` parameters per expert, twice the delta's); the
    forward runs the core once per routed pair."""

    name = "wrapper"
    per_expert_factors = True
    chunked_weights = True  # fit reads weights[a:b] only
    factor_names = ("wrap_u_in", "wrap_v_in", "wrap_u_out", "wrap_v_out")
    quantizable = True
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

    def fit(self, weights: Tensor, core: Tensor, rank: int, L: Tensor | None, K: Tensor | None, *, steps: int,
            method: str, generator: torch.Generator | None, chunk: int, device: torch.device,
            f64_factor_limit: int, expert_rank_cap: float = 2.0) -> FitResult:
        """ALS of the factors for the given core (:func:`moecore.maths.fit.fit_wrapper`; the
        core is not refined, ``K``/``method``/``generator``/``f64_factor_limit`` are unused)."""
        factors, history = fit.fit_wrapper(weights, core, rank, L, steps=steps, chunk=chunk, device=device)
        return FitResult(core.to(device=device, dtype=torch.float64), factors, history, refine_iters=len(history))

    def reconstruct(self, core: Tensor, factors: tuple[Tensor, ...]) -> Tensor:
        """``(I + U_o V_oᵀ) C (I + U_i V_iᵀ)``: ``(d_out, d_in)`` and the four factors ``-> (E, d_out, d_in)``."""
        u_in, v_in, u_out, v_out = factors
        return decompose.reconstruct_wrapper(core, u_in, v_in, u_out, v_out)

    def fused_operands(self, get: Callable[[str], Tensor], ranks: Mapping[str, int]) -> dict[str, Tensor]:
        """Grouped-GEMM weights (``(G, N, K)``, ``K``-major on CPU but the cores; ``r'`` = padded
        rank): ``gu_in_v (E, 2r', H)``, ``gu_in_u (2E, H, r')``, ``core_gu (2, F, H)``,
        ``gu_out_v (2E, r', F)``, ``gu_out_u (2E, F, r')``, ``down_in_v (E, r', F)``,
        ``down_in_u (E, F, r')``, ``core_down (H, F)``, ``down_out_v (E, r', H)``, ``down_out_u (E, H, r')``.
        Differentiable, as the delta form's."""
        rg, rd = padded_ranks(get, ranks)
        ops = {"core_down": get("core_down").contiguous()}
        ops["core_gu"] = torch.stack([get("core_gate"), get("core_up")], 0)  # (2, F, H)
        ops["gu_in_v"] = torch.cat([pad_rank(get(f"wrap_v_in_{p}"), rg).mT for p in ("gate", "up")], 1).contiguous()
        ops["gu_in_u"] = torch.cat([pad_rank(get(f"wrap_u_in_{p}"), rg) for p in ("gate", "up")], 0)  # (2E, H, r')
        ops["gu_out_v"] = torch.cat([pad_rank(get(f"wrap_v_out_{p}"), rg).mT for p in ("gate", "up")], 0).contiguous()
        ops["gu_out_u"] = torch.cat([pad_rank(get(f"wrap_u_out_{p}"), rg) for p in ("gate", "up")], 0)  # (2E, F, r')
        for side, name in (("in", "down_in"), ("out", "down_out")):
            ops[f"{name}_v"] = pad_rank(get(f"wrap_v_{side}_down"), rd).mT.contiguous()  # (E, r', d_side)
            ops[f"{name}_u"] = pad_rank(get(f"wrap_u_{side}_down"), rd).contiguous()  # (E, d_side, r')
        return cpu_layout(ops, keep=("core_gu", "core_down"))

    def forward(self, x: Tensor, route: Routing, ops: dict[str, Tensor], act: Activation,
                bias_gu: tuple[Tensor, Tensor] | None = None, bias_down: Tensor | None = None) -> Tensor:
        """Per pair ``x + U_in(V_inᵀx) -> C· -> h + U_out(V_outᵀh)``, the core once per pair.
        ``x (T, H) -> (T, H)``."""
        s, h = route.num_pairs, x.shape[1]
        xs = x[route.token]  # (S, H)
        z = route.stack2(grouped_linear(xs, ops["gu_in_v"], route.offs))  # (2S, r')
        xi = (grouped_linear(z, ops["gu_in_u"], route.offs2).view(2, s, h) + xs).view(2 * s, h)  # (2S, H)
        core_offs = torch.arange(1, 3, device=x.device, dtype=torch.int32) * s  # (2,): gate rows, up rows
        y = grouped_linear(xi, ops["core_gu"], core_offs)  # (2S, F)
        y = y + grouped_linear(grouped_linear(y, ops["gu_out_v"], route.offs2), ops["gu_out_u"], route.offs2)
        gate, up = gate_up_bias(y[:s], y[s:], route, bias_gu)  # (S, F) each
        a = act(gate, up)  # (S, F)
        a = a + grouped_linear(grouped_linear(a, ops["down_in_v"], route.offs), ops["down_in_u"], route.offs)
        y = a @ ops["core_down"].mT  # (S, H): the core once per pair
        y = y + grouped_linear(grouped_linear(y, ops["down_out_v"], route.offs), ops["down_out_u"], route.offs)
        if bias_down is not None:
            y = y + bias_down[route.expert]
        return route.to_tokens(route.weight * y)


FORM = WrapperForm()
