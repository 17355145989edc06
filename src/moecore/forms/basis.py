"""Basis form: ``W_i = C + A_i B_gᵀ``, a basis ``B_g`` on the wide side shared by 4 experts.

The shared-subspace alternative to one core (after MoBE, arXiv 2508.05257, which writes each
expert as ``A_i`` times a mix of bases shared by the layer's experts): the experts are taken
in groups of :data:`EXPERTS_PER_BASIS` consecutive experts (``g(i) = i // 4``, MoBE's grouping
of its initialisation).  On the WIDE side of each projection (``max(d_out, d_in)``; the hidden
size ``H`` on fine-grained MoEs such as Qwen3 and DeepSeek, the residual stream every expert
reads and writes) each group shares one ``(wide, s)`` basis; on the narrow side each expert
keeps its own ``(narrow, s)`` factor:

- ``d_in >= d_out`` (gate and up when ``H >= F``): ``W_i = C + A_i B_gᵀ``, the input basis shared;
- ``d_out > d_in`` (down when ``H > F``): ``W_i = C + B_g A_iᵀ``, the output basis shared.

A rank unit costs ``narrow + wide/4`` parameters per expert instead of the delta form's
``narrow + wide``, so at equal stored parameters the rank is larger; what is given up is a
private wide-side subspace per expert.

Stored tensors of projection ``p`` (``s`` its rank, ``E`` a multiple of 4):
``basis_a_{p} (E, narrow, s)`` and ``basis_b_{p} (E/4, wide, s)``.

Zero-shot fit (:func:`fit_basis`, the whitened objective ``Σ_i ‖(W_i − Ŵ_i) L_i‖_F²`` of the
other forms, ``R_i = W_i − C``), alternating:

- shared output basis: ``B_g`` = the top ``s`` eigenvectors of ``Σ_{i∈g} R_i Ĝ_i R_iᵀ`` and
  ``A_i = R_iᵀ B_g``: together the exact minimizer for a fixed core;
- shared input basis: ``B_g = K_g⁻ᵀ V`` with ``K_g K_gᵀ = Σ_{i∈g} Ĝ_i`` (the group's pooled
  Gram) and ``V`` the top ``s`` right singular vectors of ``[R_i K_g]_{i∈g}`` (exact when the
  group's experts share one input distribution), then ``A_i = R_i Ĝ_i B_g (B_gᵀ Ĝ_i B_g)⁻¹``,
  the exact minimizer for that basis with each expert's own Gram;
- core: ``C = Σ_i (W_i − ΔW_i) Ĝ_i · S⁻¹`` (exact for fixed factors).

The input-side basis step is exact only for pooled Grams, so the objective is not guaranteed
to fall at every step there; the best iterate is kept.  At ``s`` = the wide dimension the fit
is exact.

Forward: the delta form's (:class:`~moecore.forms.delta.DeltaForm`) on the basis repeated to
one per expert (``repeat_interleave``: differentiable, the shared basis collects the gradients
of its experts), so the multiply-adds per routed pair are ``s·(d_out + d_in)``, the delta
form's at the same rank.  Quantized storage: the core and both factors quantized as fitted
(no refit).
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch

from ..errors import ConfigError
from ..grouped import Activation, Routing
from ..maths import decompose
from .base import FitResult, Form, cast_floating
from .delta import FORM as DELTA

Tensor = torch.Tensor
_F64 = torch.float64

#: experts sharing one input basis (MoBE's ratio: 256 experts / 64 bases on DeepSeek-V3, 128 / 32 on Qwen3)
EXPERTS_PER_BASIS = 4


def num_bases(num_experts: int) -> int:
    """``E / 4`` bases; ``ConfigError`` unless ``E`` is a multiple of :data:`EXPERTS_PER_BASIS`."""
    if num_experts % EXPERTS_PER_BASIS:
        raise ConfigError(f"form 'basis' shares one basis among {EXPERTS_PER_BASIS} experts: it needs a multiple of "
                          f"{EXPERTS_PER_BASIS} experts per layer, got {num_experts}")
    return num_experts // EXPERTS_PER_BASIS


def expand_basis(b: Tensor, num_experts: int) -> Tensor:
    """``(E/4, d_in, s)`` bases -> ``(E, d_in, s)``, one per expert (a per-expert stack passes through)."""
    return b if b.shape[0] == num_experts else b.repeat_interleave(num_experts // b.shape[0], dim=0)


@torch.no_grad()
def fit_basis(weights: Tensor, core: Tensor, rank: int, L: Tensor | None = None, K: Tensor | None = None, *,
              steps: int = 10, tol: float = 1e-4, device=None) -> tuple[Tensor, tuple[Tensor, Tensor], list[float]]:
    """Fit core, per-expert ``A`` and shared bases ``B`` on ``Σ_i ‖(W_i − C − ΔW_i) L_i‖_F²``
    (``ΔW_i = A_i B_gᵀ`` or ``B_g A_iᵀ``, module docstring), one group of 4 experts at a time on
    ``device``, in float64.

    ``weights (E, d_out, d_in)``, ``core (d_out, d_in)`` the start, ``L (E, d_in, d_in)`` the
    whitening factors (``L_i L_iᵀ = Ĝ_i``) or ``None`` (``Ĝ_i = I``), ``K`` the lower Cholesky factor of
    ``S = Σ_i Ĝ_i`` (:func:`moecore.maths.fit.whiten_in_place`).
    Returns ``core (d_out, d_in)``, ``(A (E, narrow, s), B (E, wide, s))`` (each group's basis
    repeated for its experts, unit columns) and the objective history (start first): the best
    iterate's, its factors computed again if the last step did worse (no copy of the factor
    stacks is kept).
    """
    e, d_out, d_in = weights.shape
    m, g = num_bases(e), EXPERTS_PER_BASIS
    shares_input = d_in >= d_out
    narrow, wide = min(d_out, d_in), max(d_out, d_in)
    device = torch.device(device) if device is not None else weights.device
    if L is not None and K is None:
        raise ValueError("fit_basis: K (the Cholesky factor of S = Σ Ĝ_i) is required with L")
    groups = [slice(j * g, (j + 1) * g) for j in range(m)]
    eye = torch.eye(d_in, dtype=_F64, device=device) if L is None else None  # weight space only

    def on(t: Tensor | None, sl: slice) -> Tensor | None:
        return None if t is None else t[sl].to(device=device, dtype=_F64)

    def gram_times(l: Tensor | None, x: Tensor) -> Tensor:
        """``Ĝ_i x = L_i (L_iᵀ x)``: ``(g, d_in, d_in), (…, d_in, k) -> (g, d_in, k)``."""
        return x.expand(g, *x.shape[-2:]) if l is None else l @ (l.mT @ x)

    # once: the pooled Cholesky factor of each group (K_g K_gᵀ = Σ_{i∈g} Ĝ_i) and P = Σ_i W_i Ĝ_i
    pooled, p_acc = [], torch.zeros(d_out, d_in, dtype=_F64, device=device)
    for sl in groups:
        w, l = on(weights, sl), on(L, sl)
        if shares_input:
            pooled.append(torch.linalg.cholesky((l @ l.mT).sum(0)) if l is not None else (g ** 0.5) * eye)
        p_acc += ((w @ l) @ l.mT).sum(0) if l is not None else w.sum(0)
    s_chol = K.to(device=device, dtype=_F64) if L is not None else None  # S = K Kᵀ
    a_all = torch.zeros(e, narrow, rank, dtype=_F64, device=device)
    b_all = torch.zeros(m, wide, rank, dtype=_F64, device=device)

    def factors(c: Tensor) -> tuple[float, Tensor]:
        """Bases then factors for core ``c``; the objective and ``N = Σ_i ΔW_i Ĝ_i``."""
        err, n_acc = 0.0, torch.zeros(d_out, d_in, dtype=_F64, device=device)
        for j, sl in enumerate(groups):
            r, l = on(weights, sl) - c, on(L, sl)  # (g, d_out, d_in), (g, d_in, d_in)
            if not shares_input:  # W_i = C + B_g A_iᵀ: B_g (d_out, s) orthonormal, A_i = R_iᵀ B_g (d_in, s)
                rl = r @ l if l is not None else r  # (g, d_out, d_in)
                _, vec = torch.linalg.eigh((rl @ rl.mT).sum(0))  # Σ R_i Ĝ_i R_iᵀ, ascending (d_out, d_out)
                b = vec[:, -rank:].flip(-1)  # (d_out, s)
                a = r.mT @ b  # (g, d_in, s)
                err += float(rl.pow(2).sum() - (b.mT @ rl).pow(2).sum())  # ‖R_i L_i‖² − ‖B_gᵀ R_i L_i‖²
                n_acc += torch.einsum("os,nis->oi", b, gram_times(l, a))  # Σ B_g A_iᵀ Ĝ_i
                a_all[sl], b_all[j] = a, b
                continue
            k_g = pooled[j]  # (d_in, d_in)
            rk = r @ k_g  # residuals whitened by the pooled Gram (g, d_out, d_in)
            _, vec = torch.linalg.eigh((rk.mT @ rk).sum(0))  # ascending (d_in, d_in)
            b = torch.linalg.solve_triangular(k_g.mT, vec[:, -rank:].flip(-1), upper=True)  # K⁻ᵀ V (d_in, s)
            b = b / b.norm(dim=0, keepdim=True).clamp_min(1e-300)  # unit columns: the scale is A's
            gb = gram_times(l, b)  # Ĝ_i B (g, d_in, s)
            mi = b.mT @ gb  # Bᵀ Ĝ_i B (g, s, s)
            a = torch.linalg.solve(mi, (r @ gb).mT).mT  # A_i = R_i Ĝ_i B (Bᵀ Ĝ_i B)⁻¹ (g, d_out, s)
            energy = (r @ l).pow(2).sum() if l is not None else r.pow(2).sum()
            err += float(energy - ((a @ mi) * a).sum())  # ‖R_i L_i‖² − tr(A_i Bᵀ Ĝ_i B A_iᵀ)
            n_acc += torch.einsum("nos,nis->oi", a, gb)
            a_all[sl], b_all[j] = a, b
        return max(err, 0.0), n_acc

    def core_step(n_acc: Tensor) -> Tensor:
        rhs = p_acc - n_acc  # Σ_i (W_i − A_i B_gᵀ) Ĝ_i  (d_out, d_in)
        return torch.cholesky_solve(rhs.mT, s_chol).mT if s_chol is not None else rhs / e

    core = core.to(device=device, dtype=_F64)
    err, n_acc = factors(core)
    history, best_core = [err], core  # a_all, b_all hold the best core's factors unless a later step did worse
    for _ in range(steps):
        core = core_step(n_acc)
        err, n_acc = factors(core)
        history.append(err)
        if err < min(history[:-1]):
            best_core = core
        if history[-2] - err <= tol * max(err, 1e-30):  # converged, or the basis step stopped paying
            break
    if core is not best_core:  # the last step did worse (rounding): the best core's factors again,
        core = best_core  # not a snapshot of the factor stacks kept at every improvement
        factors(core)
    return core, (a_all, expand_basis(b_all, e)), history


def shares_input(d_out: int, d_in: int) -> bool:
    """Whether the shared basis is on the input side (``d_in >= d_out``) or the output side."""
    return d_in >= d_out


class BasisForm(Form):
    """``W_i = C + A_i B_gᵀ`` (or ``B_g A_iᵀ``): ``A_i (narrow, s)`` per expert, ``B_g (wide, s)`` per group of 4."""

    name = "basis"
    chunked_weights = True  # fit reads weights[a:b] only
    factor_names = ("basis_a", "basis_b")
    counts_note = ("basis form: one (wide side, rank) basis per 4 experts; a routed pair costs rank·(d_out + d_in) "
                   "multiply-adds, as the delta form at the same rank, while a rank unit stores narrow + wide/4 "
                   "parameters per expert")
    quantizable = True

    def factor_shapes(self, num_experts: int, d_out: int, d_in: int, rank: int) -> tuple[tuple[int, ...], ...]:
        """``A (E, narrow, s)``, ``B (E/4, wide, s)``."""
        return (num_experts, min(d_out, d_in), rank), (num_bases(num_experts), max(d_out, d_in), rank)

    def rank_unit_params(self, d_out: int, d_in: int) -> int | float:
        """``narrow + wide/4``: one column of ``A_i``, and a quarter of one column of its group's basis."""
        wide = max(d_out, d_in)
        return min(d_out, d_in) + (wide // EXPERTS_PER_BASIS if wide % EXPERTS_PER_BASIS == 0
                                   else wide / EXPERTS_PER_BASIS)

    def projection_params(self, num_experts: int, d_out: int, d_in: int, rank: int) -> int:
        """``d_out·d_in + s·(E·narrow + E/4·wide)``."""
        return d_out * d_in + rank * (num_experts * min(d_out, d_in) + num_bases(num_experts) * max(d_out, d_in))

    def core_runs_per_token(self, top_k: int) -> int:
        """1: the core is applied to each token once."""
        return 1

    def active_macs_per_token(self, d_out: int, d_in: int, factor_params: int, top_k: int) -> int:
        """The core once plus ``top_k`` pairs of ``s·(d_out + d_in)``; ``s`` is recovered from
        one expert's share of the factors, ``factor_params = s·(narrow + wide/4)``."""
        g = EXPERTS_PER_BASIS
        rank = round(factor_params * g / (g * min(d_out, d_in) + max(d_out, d_in)))
        return d_out * d_in + top_k * rank * (d_out + d_in)

    def fit(self, weights: Tensor, core: Tensor, rank: int, L: Tensor | None, K: Tensor | None, *, steps: int,
            method: str, generator: torch.Generator | None, chunk: int, device: torch.device,
            f64_factor_limit: int, expert_rank_cap: float = 2.0) -> FitResult:
        """:func:`fit_basis` (exact eigendecompositions: ``method``, ``chunk`` and
        ``expert_rank_cap`` do not apply)."""
        core, factors, history = fit_basis(weights, core, rank, L, K, steps=steps, device=device)
        return FitResult(core, factors, history, refine_iters=len(history) - 1)

    def to_stored(self, num_experts: int, factors: tuple[Tensor, ...],
                  dtype: torch.dtype | None = None) -> tuple[int, tuple[Tensor, ...]]:
        """Fitted ``(A (E, narrow, s), B (E, wide, s))`` -> ``(s, (A, B[::4] (E/4, wide, s)))``
        (cast to ``dtype`` if given)."""
        a, b = factors
        if b.shape[0] == num_experts:
            b = b[::EXPERTS_PER_BASIS]
        return int(a.shape[-1]), (cast_floating(a, dtype), cast_floating(b, dtype))

    @staticmethod
    def _delta_factors(d_out: int, d_in: int, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """The delta form's ``(A (E, d_out, s), B (E, d_in, s))`` of ``C + A Bᵀ`` with the basis per expert."""
        b = expand_basis(b, a.shape[0])
        return (a, b) if shares_input(d_out, d_in) else (b, a)

    def reconstruct(self, core: Tensor, factors: tuple[Tensor, ...]) -> Tensor:
        """``C + A_i B_gᵀ`` or ``C + B_g A_iᵀ`` ``(E, d_out, d_in)``, from per-expert or shared bases."""
        return decompose.reconstruct_delta(core, *self._delta_factors(*core.shape, *factors))

    def fused_operands(self, get: Callable[[str], Tensor], ranks: Mapping[str, int]) -> dict[str, Tensor]:
        """The delta form's operands (:meth:`DeltaForm.fused_operands`) with each basis repeated per expert."""
        per_expert = {}
        for p in ("gate", "up", "down"):
            core = get(self.core_name(p))
            a, b = (get(n) for n in self.param_names(p))
            for name, t in zip(DELTA.param_names(p), self._delta_factors(*core.shape, a, b)):
                per_expert[name] = t
        return DELTA.fused_operands(lambda n: per_expert[n] if n in per_expert else get(n), ranks)

    def forward(self, x: Tensor, route: Routing, ops: dict[str, Tensor], act: Activation,
                bias_gu: tuple[Tensor, Tensor] | None = None, bias_down: Tensor | None = None) -> Tensor:
        """The delta form's forward on :meth:`fused_operands`. ``x (T, H) -> (T, H)``."""
        return DELTA.forward(x, route, ops, act, bias_gu, bias_down)


FORM = BasisForm()
