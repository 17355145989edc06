"""Delta form: ``W_i = C + A_i B_iᵀ``, the core applied once per token.

Stored factors of projection ``p`` (``d_out, d_in`` its shape, ``s`` its rank):
``delta_a_{p} (E, d_out, s)``, ``delta_b_{p} (E, d_in, s)``.

Forward (:meth:`DeltaForm.forward`): each core once per token (dense GEMM), plus per routed
pair ``A_i (B_iᵀ x)`` as two grouped GEMMs, gate and up in one grouped pass; on CPU its own
path (:func:`_forward_cpu`), chosen by measurement (RESULTS §6).  Quantized storage: the
factors are refit to ``W_i − Q(C)``, then ``B`` is re-solved for ``Q(A)``.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch

from ..grouped import (Activation, Routing, cpu_core, cpu_layout, dense_linear, gate_up_bias, grouped_linear,
                       pad_rank, padded_ranks)
from ..maths import decompose, fit
from .base import FitResult, Form

Tensor = torch.Tensor


class DeltaForm(Form):
    """``W_i = C + A_i B_iᵀ``: one rank unit is one column of ``A_i`` and of ``B_i``
    (``d_out + d_in`` parameters per expert); the forward runs each core once per token plus
    ``k`` low-rank paths."""

    name = "delta"
    per_expert_factors = True
    chunked_weights = True  # fit reads weights[a:b] only
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

    def fit(self, weights: Tensor, core: Tensor, rank: int, L: Tensor | None, K: Tensor | None, *, steps: int,
            method: str, generator: torch.Generator | None, chunk: int, device: torch.device,
            f64_factor_limit: int, expert_rank_cap: float = 2.0) -> FitResult:
        """Block-coordinate descent of core and factors (:func:`moecore.maths.fit.fit_delta`);
        factor stacks over ``f64_factor_limit`` float64 bytes are kept in float32 between
        steps."""
        return self._fit_delta(weights, core, rank, L, K, steps=steps, method=method, generator=generator,
                               chunk=chunk, device=device, f64_factor_limit=f64_factor_limit)

    def _fit_delta(self, weights: Tensor, core: Tensor, rank: int, L: Tensor | None, K: Tensor | None, *,
                   steps: int, method: str, generator: torch.Generator | None, chunk: int, device: torch.device,
                   f64_factor_limit: int, rank_cap: int | None = None) -> FitResult:
        """:func:`moecore.maths.fit.fit_delta` with this form's storage policy (shared with the
        ragged form, which passes ``rank_cap``)."""
        e, d_out, d_in = weights.shape
        info: dict = {}
        core, factors, history = fit.fit_delta(
            weights, core, rank, L, K, steps=steps, method=method, generator=generator, chunk=chunk, device=device,
            factor_dtype=fit.factor_dtype(method, e * (d_out + d_in) * (rank_cap or rank) * 8, f64_factor_limit),
            compute_dtype=fit.compute_dtype(method),
            rank_cap=rank_cap, info=info)
        return FitResult(core, factors, history, refine_iters=len(history) - 1, whitened=info.get("whitened"))

    def reconstruct(self, core: Tensor, factors: tuple[Tensor, ...]) -> Tensor:
        """``C + A_i B_iᵀ``: ``(d_out, d_in), ((E, d_out, s), (E, d_in, s)) -> (E, d_out, d_in)``."""
        a, b = factors
        return decompose.reconstruct_delta(core, a, b)

    # ------------------------------------------------------------------ quantized storage
    def refit_factors(self, weights: Tensor, core: Tensor, rank: int, L: Tensor | None, K: Tensor | None, *,
                      chunk: int | None = None, device=None, method: str = "exact") -> tuple[Tensor, ...]:
        """``(A, B)`` of ``W_i − C`` for the fixed ``core``: the fit's factor step alone
        (:func:`moecore.maths.fit.fit_delta` with no refinement), whitened by ``L`` when given,
        ``chunk`` experts at a time: the whitened truncated SVD of every residual."""
        _, factors, _ = fit.fit_delta(weights, core, rank, L, K, steps=0, method=method, chunk=chunk, device=device,
                                      compute_dtype=fit.compute_dtype(method))
        return factors

    def quantize_factors(self, factors: tuple[Tensor, ...], quantize: Callable[[int, Tensor], Tensor], *,
                         residual: Callable[[slice], Tensor] | None = None, resolve: bool = True,
                         chunk: int | None = None) -> tuple[Tensor, ...]:
        """``Q(A)``; with ``resolve``, ``B`` re-solved for ``Q(A)`` by exact least squares
        (``Bᵀ = Q(A)⁺ R``, which minimises ``‖(R − Q(A) Bᵀ) L‖`` for any whitening ``L``;
        ``R = residual(experts)``, ``chunk`` experts at a time, or ``A Bᵀ`` without one); then ``Q(B)``."""
        a, b = factors
        qa = quantize(0, a)  # (E, d_out, s)
        if resolve:
            pinv = torch.linalg.pinv(qa)  # (E, s, d_out)
            if residual is not None:
                b = torch.cat([(pinv[sl] @ residual(sl)).mT for sl in fit.chunks_of(a.shape[0], chunk or a.shape[0])])
            else:
                b = (pinv @ a @ b.mT).mT  # (E, d_in, s)
        return qa, quantize(1, b)

    # ------------------------------------------------------------------ forward
    def fused_operands(self, get: Callable[[str], Tensor], ranks: Mapping[str, int]) -> dict[str, Tensor]:
        """Grouped-GEMM weights, all ``(G, N, K)`` (``K``-major on CPU), built from the stored
        tensors that ``get(name)`` returns.  Differentiable (``cat``/``pad``): built per call in
        training, gradients reach the stored parameters.

        ``s'`` = padded rank; ``g``/``u``/``d`` = gate/up/down:
        ``core_gu (2F, H)``, ``gu_in (E, 2s', H)`` = [B_gᵀ; B_uᵀ], ``gu_out (2E, F, s')`` = [A_g; A_u],
        ``core_down (H, F)``, ``down_in (E, s', F)`` = B_dᵀ, ``down_out (E, H, s')`` = A_d.
        On CPU the cores stay apart, ``core_gate``/``core_up (F, H)`` and ``core_down``, each
        :func:`~moecore.grouped.cpu_core` (no ``core_gu``).
        """
        rg, rd = padded_ranks(get, ranks)
        if get("core_gate").device.type == "cpu":
            ops = {f"core_{p}": cpu_core(get(f"core_{p}")) for p in ("gate", "up", "down")}
        else:
            ops = {"core_down": get("core_down").contiguous()}
            ops["core_gu"] = torch.cat([get("core_gate"), get("core_up")], 0)  # (2F, H)
        ops["gu_in"] = torch.cat([pad_rank(get(f"delta_b_{p}"), rg).mT for p in ("gate", "up")], 1).contiguous()
        ops["gu_out"] = torch.cat([pad_rank(get(f"delta_a_{p}"), rg) for p in ("gate", "up")], 0)  # (2E, F, s')
        ops["down_in"] = pad_rank(get("delta_b_down"), rd).mT.contiguous()  # (E, s', F)
        ops["down_out"] = pad_rank(get("delta_a_down"), rd).contiguous()  # (E, H, s')
        return cpu_layout(ops, keep=("core_gate", "core_up", "core_down"))

    def forward(self, x: Tensor, route: Routing, ops: dict[str, Tensor], act: Activation,
                bias_gu: tuple[Tensor, Tensor] | None = None, bias_down: Tensor | None = None) -> Tensor:
        """Cores once per token, per pair ``A_i (B_iᵀ ·)``.  ``x (T, H) -> (T, H)``;
        ``bias_gu`` = gate/up biases ``(E, F)`` each, ``bias_down (E, H)``."""
        if "core_gu" not in ops:  # CPU operands (fused_operands): the CPU path
            return _forward_cpu(x, route, ops, act, bias_gu, bias_down)
        s, f = route.num_pairs, ops["core_down"].shape[1]
        xs = x[route.token]  # (S, H)
        core = x @ ops["core_gu"].mT  # (T, 2F): one dense GEMM per token for gate and up
        low = grouped_linear(route.stack2(grouped_linear(xs, ops["gu_in"], route.offs)), ops["gu_out"], route.offs2)
        c = core[route.token]  # (S, 2F)
        gate, up = gate_up_bias(c[:, :f] + low[:s], c[:, f:] + low[s:], route, bias_gu)  # (S, F) each
        hw = route.weight * act(gate, up)  # (S, F), weighted: the down path is linear in h
        mixed = route.to_tokens(hw)  # (T, F) = Σ_pairs w h
        y = grouped_linear(grouped_linear(hw, ops["down_in"], route.offs), ops["down_out"], route.offs)  # (S, H)
        if bias_down is not None:
            y = y + route.weight * bias_down[route.expert]
        return mixed @ ops["core_down"].mT + route.to_tokens(y)  # one dense GEMM per token for down


def _forward_cpu(x: Tensor, route: Routing, ops: dict, act: Activation,
                 bias_gu: tuple | None = None, bias_down: Tensor | None = None) -> Tensor:
    """:meth:`DeltaForm.forward` on CPU operands, the same maths: gate, up and down cores each
    one :func:`~moecore.grouped.dense_linear` per token (as stored when large: at Mixtral-8x7B,
    64 tokens, the fused ``K``-major gate/up GEMM took 1.4x the time, and the whole forward
    about 1.5x that of commit 98aef90's, RESULTS §6), the per-pair core rows gathered per
    projection (no ``(S, 2F)`` gather and strided halves), and the result built in the
    ``(T, H)`` tensor of :meth:`~moecore.grouped.Routing.to_tokens`.  Without autograd the
    ``(S, F)`` sums and the weighting are done in place (fewer large temporaries; same values)."""
    s, inplace = route.num_pairs, not torch.is_grad_enabled()
    xs = x[route.token]  # (S, H)
    low = grouped_linear(route.stack2(grouped_linear(xs, ops["gu_in"], route.offs)), ops["gu_out"], route.offs2)
    cg = dense_linear(x, ops["core_gate"])[route.token]  # (S, F)
    cu = dense_linear(x, ops["core_up"])[route.token]  # (S, F)
    gate, up = (low[:s].add_(cg), low[s:].add_(cu)) if inplace else (cg + low[:s], cu + low[s:])
    gate, up = gate_up_bias(gate, up, route, bias_gu)
    h = act(gate, up)  # (S, F)
    hw = h.mul_(route.weight) if inplace else route.weight * h  # weighted: the down path is linear in h
    mixed = route.to_tokens(hw)  # (T, F) = Σ_pairs w h
    y = grouped_linear(grouped_linear(hw, ops["down_in"], route.offs), ops["down_out"], route.offs)  # (S, H)
    if bias_down is not None:
        y = y + route.weight * bias_down[route.expert]
    return route.to_tokens(y).add_(dense_linear(mixed, ops["core_down"]))  # (T, H), contiguous


FORM = DeltaForm()
