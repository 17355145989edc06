"""Fitting one projection's core and factors, ``chunk`` experts at a time (pure maths).

At real scale a projection's experts and their whitening factors do not fit one GPU
together: Mixtral-8x7B's down projection has 8 whitening factors of 14336² float64 values
(13 GB) next to 3.8 GB of float64 weights.  The functions here take the stacked tensors
wherever the caller keeps them (usually host memory, in their storage dtype), move ``chunk``
experts at a time to ``device`` in float64, and keep on ``device`` only the core, the
factors (a fraction of the weights) and one chunk.

Storage precision.  ``grams`` may be stored in float32 (the caller decides; see
:mod:`moecore.calibration`).  Each Gram is accumulated in float64 and only its final value
is rounded, which perturbs the whitened objective by a factor within ``(1±ρ)/(1∓ρ)`` with
``ρ ≤ u·d/λ`` (u = 2⁻²⁴, d = input dim, λ = relative damping): ρ ≈ 0.012 at d = 2048 and
0.09 at d = 14336 for the default λ = 0.01.  The Cholesky factor stored in place of the
Gram is rounded in the same way.

Notation as in :mod:`.decompose`: ``W (E, d_out, d_in)``, ``L_i`` lower-triangular with
``L_i L_iᵀ = Ĝ_i = G_i + λ_i I``; delta objective ``Σ_i ‖(W_i − C − A_i B_iᵀ) L_i‖_F²``.
"""
from __future__ import annotations

import torch

from .decompose import damped_grams, gram_svd, solve_lt, split_sqrt, truncated_svd, wrapper_factors
from .triangular import lower_left, lower_right, upper_right

Tensor = torch.Tensor
_F64 = torch.float64


def chunks_of(num_experts: int, chunk: int) -> list[slice]:
    """``[slice(0, chunk), slice(chunk, 2·chunk), ...]`` covering ``num_experts``."""
    chunk = max(1, int(chunk))
    return [slice(i, min(i + chunk, num_experts)) for i in range(0, num_experts, chunk)]


def compute_dtype(method: str) -> torch.dtype:
    """Working precision of the fit's products and SVDs: float32 for the randomized and gram
    paths (real shapes; bounds in docs/DESIGN.md "Precision of the fit"), float64 for the exact
    path (short sides up to 512 with ``svd="auto"``: cheap, and the bundled models' results)."""
    return torch.float32 if method in ("randomized", "gram") else _F64


def factor_dtype(method: str, f64_bytes: int, f64_limit: int) -> torch.dtype:
    """Storage of the factor stacks: float32 above ``f64_limit`` bytes in float64, else the working one."""
    return torch.float32 if f64_bytes > f64_limit else compute_dtype(method)


def _on(t: Tensor | None, sl: slice, device) -> Tensor | None:
    return None if t is None else t[sl].to(device=device, dtype=_F64)


@torch.no_grad()
def expert_core(weights: Tensor, frequencies: Tensor | None = None, *, chunk: int | None = None,
                device=None) -> Tensor:
    """Shared core of a projection: the mean of the experts, or the mean weighted by
    ``frequencies (E,)`` (router hit counts; all-zero falls back to the plain mean), summed
    ``chunk`` experts at a time.  ``(E, d_out, d_in) -> (d_out, d_in)`` float64 on ``device``."""
    e, d_out, d_in = weights.shape
    device = torch.device(device) if device is not None else weights.device
    f = None
    if frequencies is not None and float(frequencies.sum()) > 0:
        f = frequencies.to(dtype=_F64) / frequencies.to(dtype=_F64).sum()  # (E,)
    out = torch.zeros(d_out, d_in, dtype=_F64, device=device)
    for sl in chunks_of(e, chunk or e):
        w = _on(weights, sl, device)
        out += torch.einsum("e,eoi->oi", f[sl].to(device), w) if f is not None else w.sum(0)
    return out if f is not None else out / e


@torch.no_grad()
def output_core(weights: Tensor, grams: Tensor, damping: float = 0.01, *, chunk: int | None = None,
                device=None) -> Tensor:
    """Shared core minimizing the rank-0 output error ``Σ_i ‖(W_i − C) X_iᵀ‖_F²``:
    ``C = (Σ_i W_i G_i)(Σ_i G_i + λ·mean(diag)·I)⁻¹``, summed ``chunk`` experts at a time.

    It generalizes the frequency-weighted mean (equal to it when every expert sees the same
    input distribution, ``G_i ∝ n_i·G``).  ``grams (E, d_in, d_in)``; all-zero Grams give the
    plain mean."""
    e, d_out, d_in = weights.shape
    device = torch.device(device) if device is not None else weights.device
    m = torch.zeros(d_out, d_in, dtype=_F64, device=device)
    s = torch.zeros(d_in, d_in, dtype=_F64, device=device)
    for sl in chunks_of(e, chunk or e):
        g = _on(grams, sl, device)
        m += torch.einsum("eoi,eij->oj", _on(weights, sl, device), g)
        s += g.sum(0)
    scale = torch.diagonal(s).mean()
    if float(scale) <= 0:
        return expert_core(weights, chunk=chunk, device=device)
    s = s + (damping * scale + 1e-10 * scale) * torch.eye(d_in, dtype=_F64, device=device)
    return torch.linalg.solve(s, m.mT).mT  # C S = M (S symmetric)


@torch.no_grad()
def whiten_in_place(grams: Tensor, damping: float, chunk: int, device) -> tuple[Tensor, Tensor]:
    """Replace every ``G_i`` of ``grams (E, d, d)`` (any device/dtype) by its whitening factor
    ``L_i`` (lower Cholesky factor of ``Ĝ_i``), in place and in ``grams``' dtype.

    A stack stored in float32 (real shapes, ``fitting.gram_storage``) is factored in float32:
    the factor is rounded to float32 anyway, and a float32 Cholesky's backward error is of the
    same size as that rounding (docs/DESIGN.md "Precision of the fit"); an expert whose float32
    factorization fails is factored in float64.  Other dtypes are factored in float64.

    Returns ``K (d, d)``, the lower Cholesky factor of ``S = Σ_i Ĝ_i`` (float64, on ``device``;
    the core update solves with it; factored in place, so ``S`` and its factor never coexist:
    1.6 GB each at d = 14336), and ``λ (E,)`` (float64) so that ``Ĝ_i = G_i + λ_i I``.
    """
    e, d, _ = grams.shape
    total = torch.zeros(d, d, dtype=_F64, device=device)  # (d, d)
    lams = torch.zeros(e, dtype=_F64)
    low = grams.dtype == torch.float32
    for sl in chunks_of(e, chunk):
        g, lam = damped_grams(grams[sl].to(device), damping)  # (c, d, d) float64
        total += g.sum(0)
        if low:  # float32 factors of the float32-stored Grams
            g32 = g.to(torch.float32)
            L, info = torch.linalg.cholesky_ex(g32)
            bad = info != 0
            if bool(bad.any()):  # too ill-conditioned for float32: those experts in float64
                L[bad] = _cholesky64(g[bad], lam[bad], device).to(L.dtype)
            del g32
        else:
            L = _cholesky64(g, lam, device)
        grams[sl] = L.to(device=grams.device, dtype=grams.dtype)
        lams[sl] = lam.cpu()
        del g, L
    info = torch.empty((), dtype=torch.int32, device=device)
    torch.linalg.cholesky_ex(total, out=(total, info))  # S = K Kᵀ, K in place of S (lower)
    if int(info) != 0:
        raise ValueError("whiten_in_place: Σ Ĝ_i is not positive definite (a non-finite Gram?)")
    return total, lams  # cholesky_ex writes the upper triangle as zeros


def _cholesky64(g: Tensor, lam: Tensor, device) -> Tensor:
    """Lower Cholesky factors of float64 ``g (c, d, d)``; a numerically indefinite one gets a
    slightly stronger ridge ``1e-4·λ``."""
    L, info = torch.linalg.cholesky_ex(g)
    if bool((info != 0).any()):
        L = torch.linalg.cholesky(g + (1e-4 * lam)[:, None, None] * torch.eye(g.shape[-1], dtype=_F64, device=device))
    return L


@torch.no_grad()
def fit_delta(
    weights: Tensor, core: Tensor, rank: int, L: Tensor | None = None, K: Tensor | None = None, *,
    steps: int = 10, tol: float = 1e-4, method: str = "exact", generator: torch.Generator | None = None,
    chunk: int | None = None, device=None, factor_dtype: torch.dtype = _F64,
    compute_dtype: torch.dtype = _F64, rank_cap: int | None = None, info: dict | None = None,
) -> tuple[Tensor, tuple[Tensor, Tensor], list[float]]:
    """Jointly fit core and delta factors by block-coordinate descent on
    ``Σ_i ‖(W_i − C − A_i B_iᵀ) L_i‖_F²`` (``L_i = I`` without ``L``).

    Alternates the closed-form factors for a fixed core (truncated SVD of the whitened
    residuals, Eckart–Young; randomized SVDs are warm-started from the previous step's
    subspace) and the closed-form core for fixed factors
    ``C = Σ_i (W_i − A_i B_iᵀ) Ĝ_i · S⁻¹ = (P − N) S⁻¹`` with ``S = Σ_i Ĝ_i``,
    ``P = Σ_i W_i Ĝ_i`` (fixed: computed once, in the first pass, as
    ``Σ_i R_i L_i L_iᵀ + C₀ S``) and ``N = Σ_i A_i (L_i B̃_i)ᵀ`` (low rank, accumulated
    while the factors are computed; ``B̃_i = L_iᵀ B_i`` is the whitened right factor).
    So one refinement step costs ONE whitened product ``(W_i − C) L_i`` per expert.  Both steps
    are exact minimizers (up to the SVD method and rounding), so the objective does not
    increase; the best iterate is returned, and iteration stops when the relative improvement
    is below ``tol``.  No copy of the factor stacks is kept for that (at DeepSeek-V3's shape a
    copy is 7.4 GB): only the best core is, and where the last step did worse (rounding, a
    randomized SVD) the best core's factors are computed again, one factor pass.

    ``method="exact"`` takes the top singular triplets from the symmetric eigendecomposition
    of the smaller Gram of the whitened residual (:func:`.decompose.gram_svd`), in float64.

    Args:
        weights: ``(E, d_out, d_in)`` in any dtype, on any device (moved a chunk at a time).
        core: ``(d_out, d_in)`` the start.
        L: ``(E, d_in, d_in)`` whitening factors (:func:`whiten_in_place`) or ``None``.
        K: ``(d_in, d_in)`` the lower Cholesky factor of ``S = Σ_i Ĝ_i`` (:func:`whiten_in_place`;
            required with ``L``).
        chunk / device: experts per chunk (default all) and where the maths runs (default
            the weights' device).
        factor_dtype: storage of the factor stacks between steps.
        compute_dtype: dtype of the per-expert products and SVDs (float32 for the randomized
            path at real shapes, see docs/DESIGN.md "Precision of the fit"); the core, ``P``,
            ``N`` and the objective are accumulated in float64.
        rank_cap: per-expert ranks (water-filling).  ``rank`` is then the MEAN rank: each
            factor step keeps, over all experts of the projection, the ``E·rank`` largest
            whitened residual components ``σ_ij²`` (at most ``rank_cap`` per expert), the exact
            minimizer of the objective for a fixed core under that total (so the descent stays
            monotone).  Factors are returned ``rank_cap`` wide with the unused columns zero.
        info: if a dict, it receives, with ``L``, ``info["whitened"] =
            (Σ_i ‖Δ_i L_i‖², Σ_i ‖W_i L_i‖²)``: the objective of the returned iterate and the
            total without a product of its own, ``Σ_i ‖R_i L_i‖² + 2⟨C₀, Σ_i R_i Ĝ_i⟩ + ⟨C₀ S, C₀⟩``
            from the first pass (``R_i = W_i − C₀``); :func:`errors` then need not recompute them.
    Returns ``core (d_out, d_in)`` float64, ``(A (E, d_out, s), B (E, d_in, s))`` (in
    ``factor_dtype`` on ``device``; with ``rank_cap``: ``s = min(rank_cap, d_out, d_in)`` and
    a third element, the per-expert ranks ``(E,)`` int64) and the objective history (start first).
    """
    e, d_out, d_in = weights.shape
    device = torch.device(device) if device is not None else weights.device
    parts = chunks_of(e, chunk or e)
    if L is not None and K is None:
        raise ValueError("fit_delta: K (the Cholesky factor of S = Σ Ĝ_i) is required with L")
    cdt = compute_dtype
    s_chol = K.to(device=device, dtype=_F64) if L is not None else None  # (d_in, d_in), S = K Kᵀ
    budget = e * rank  # rank units kept in all (per-expert ranks: water-filled under this total)
    width = rank if rank_cap is None else min(rank_cap, d_out, d_in)
    a_all = torch.zeros(e, d_out, width, dtype=factor_dtype, device=device)
    b_all = torch.zeros(e, d_in, width, dtype=factor_dtype, device=device)
    energy = torch.zeros(e, width, dtype=_F64, device=device) if rank_cap is not None else None  # σ_ij²
    v_prev: list[Tensor | None] = [None] * len(parts)
    acc: dict[str, Tensor | None] = {"P": None}
    total: list[float] = []  # Σ_i ‖W_i L_i‖², from the first pass

    def on(t: Tensor | None, sl: slice) -> Tensor | None:
        return None if t is None else t[sl].to(device=device, dtype=cdt)

    def factors(c: Tensor, first: bool) -> tuple[float, Tensor]:
        """Fill ``a_all, b_all`` for core ``c``; return the objective and ``N (d_out, d_in)``."""
        err = rl2 = 0.0
        n_acc = torch.zeros(d_out, d_in, dtype=_F64, device=device)
        # P: for the core steps, and for the report's Σ‖W_i L_i‖² (without it errors() redoes every product)
        p_acc = torch.zeros(d_out, d_in, dtype=_F64, device=device) if first and (steps > 0 or info is not None) \
            else None
        cc = c.to(cdt)
        for j, sl in enumerate(parts):
            w, l = on(weights, sl), on(L, sl)  # (n, d_out, d_in), (n, d_in, d_in)
            r = w - cc
            del w
            rl = lower_right(r, l) if l is not None else r  # whitened residual (n, d_out, d_in)
            if p_acc is not None:  # Σ_i R_i L_i L_iᵀ  (once)
                p_acc += upper_right(rl, l).sum(0, dtype=_F64) if l is not None else rl.sum(0, dtype=_F64)
            if method in ("exact", "gram"):  # exact top triplets from the smaller Gram, float64 / float32
                a, bw, kept = gram_svd(rl.to(_F64) if method == "exact" else rl, width)  # (n,d_out,s) (n,d_in,s) (n,)
            else:
                u, sv, v = truncated_svd(rl, width, method, generator=generator, init=v_prev[j])
                v_prev[j] = v if method == "randomized" else None
                a, bw = split_sqrt(u, sv, v)  # (n, d_out, s), (n, d_in, s)
                kept = sv.to(_F64).pow(2).sum(-1)  # (n,)
            rl2_j = float(rl.pow(2).sum(dtype=_F64))  # Σ_i ‖R_i L_i‖² over the chunk
            rl2 += rl2_j
            err += rl2_j - (float(kept.sum()) if energy is None else 0.0)  # ‖RL‖² − Σ σ²
            del rl, r
            a_all[sl] = a.to(factor_dtype)
            if energy is not None:  # balanced: ‖a_j‖² = ‖b̃_j‖² = σ_j; B̃ stays whitened until the ranks are chosen
                energy[sl] = a.to(_F64).pow(2).sum(-2) * bw.to(_F64).pow(2).sum(-2)  # (n, s) σ²
                b_all[sl] = bw.to(factor_dtype)
                continue
            b_all[sl] = (solve_lt(l.to(bw.dtype), bw) if l is not None else bw).to(factor_dtype)
            lb = lower_left(l.to(bw.dtype), bw) if l is not None else bw  # Ĝ_i B_i = L_i B̃_i  (n, d_in, s)
            n_acc += torch.einsum("nos,nis->oi", a.to(_F64), lb.to(_F64))
        if energy is not None:  # keep the E·rank largest σ² over all experts, then N for them
            acc["ranks"], kept_all = _water_fill(energy, a_all, b_all, budget)  # zeroes the dropped columns of B̃ too
            err -= float(kept_all)
            for sl in parts:  # products in the working precision, as above (no float64 copy of L_i)
                a, bw, l = a_all[sl].to(_F64), b_all[sl].to(cdt), on(L, sl)
                lb = lower_left(l, bw) if l is not None else bw  # Ĝ_i B_i = L_i B̃_i  (n, d_in, s)
                n_acc += torch.einsum("nos,nis->oi", a, lb.to(_F64))
                if l is not None:  # B_i = L_i⁻ᵀ B̃_i, each column on its own: the zeroed ones stay zero
                    b_all[sl] = solve_lt(l, bw).to(factor_dtype)
        if p_acc is not None:
            cs = (c @ s_chol) @ s_chol.mT if s_chol is not None else e * c  # C₀ S = (C₀ K) Kᵀ  (d_out, d_in)
            if s_chol is not None:  # Σ_i ‖W_i L_i‖² = Σ‖R_i L_i‖² + 2⟨C₀, Σ R_i Ĝ_i⟩ + ⟨C₀ S, C₀⟩
                total.append(rl2 + float(2 * (c * p_acc).sum() + (cs * c).sum()))
            acc["P"] = p_acc + cs
        return max(err, 0.0), n_acc

    def core_step(n_acc: Tensor) -> Tensor:
        m = acc["P"] - n_acc  # Σ_i (W_i − A_i B_iᵀ) Ĝ_i  (d_out, d_in)
        return torch.cholesky_solve(m.mT, s_chol).mT if s_chol is not None else m / e  # m S⁻¹ (S symmetric)

    core = core.to(device=device, dtype=_F64)

    err, n_acc = factors(core, first=True)
    history = [err]
    best_core, best_err = core, err  # a_all, b_all hold the best core's factors unless a later step did worse
    for _ in range(steps):
        core = core_step(n_acc)
        err, n_acc = factors(core, first=False)
        improved = history[-1] - err
        history.append(err)
        if err < best_err:
            best_core, best_err = core, err
        if improved <= tol * max(err, 1e-30):
            break
    if core is not best_core:  # the last step did worse: the best core's factors again
        core = best_core
        best_err, _ = factors(core, first=False)
    if info is not None and total:
        info["whitened"] = (best_err, total[0])
    extra = (acc["ranks"],) if energy is not None else ()
    return core, (a_all, b_all, *extra), history


def _water_fill(energy: Tensor, a: Tensor, b: Tensor, budget: int) -> tuple[Tensor, Tensor]:
    """Keep the ``budget`` largest entries of ``energy (E, s)`` (each row descending: expert
    ``i``'s ``σ_ij²``) as a prefix of each expert's columns of ``a (E, d_out, s)`` and
    ``b (E, d_in, s)``, zeroing the rest in place.  Returns the per-expert ranks ``(E,)``
    int64 (summing to ``min(budget, E·s)``) and the kept energy (0-dim)."""
    e, s = energy.shape
    order = energy.flatten().argsort(descending=True, stable=True)[:min(budget, e * s)]
    counts = torch.bincount(torch.div(order, s, rounding_mode="floor"), minlength=e)  # (E,) ranks
    keep = torch.arange(s, device=energy.device) < counts[:, None]  # (E, s) a prefix per expert
    a.mul_(keep[:, None, :].to(a.dtype))
    b.mul_(keep[:, None, :].to(b.dtype))
    return counts, (energy * keep).sum()


@torch.no_grad()
def fit_wrapper(
    weights: Tensor, core: Tensor, rank: int, L: Tensor | None = None, *, steps: int = 10, tol: float = 1e-4,
    chunk: int | None = None, device=None,
) -> tuple[tuple[Tensor, Tensor, Tensor, Tensor], list[float]]:
    """Wrapper factors by ALS (:func:`.decompose.wrapper_factors`), ``chunk`` experts at a
    time (the experts are independent for a fixed core).  Returns the four factor stacks
    (float64 on ``device``) and the summed objective history (chunks that stopped early
    keep their last value)."""
    e = weights.shape[0]
    device = torch.device(device) if device is not None else weights.device
    core = core.to(device=device, dtype=_F64)
    outs: list[tuple[Tensor, ...]] = []
    hists: list[list[float]] = []
    for sl in chunks_of(e, chunk or e):
        fac, hist = wrapper_factors(_on(weights, sl, device), core, rank, steps=steps, tol=tol,
                                    whitening=_on(L, sl, device))
        outs.append(fac)
        hists.append(hist)
    n = max(len(h) for h in hists)
    history = [sum(h[min(i, len(h) - 1)] for h in hists) for i in range(n)]
    return tuple(torch.cat([o[i] for o in outs]) for i in range(4)), history


@torch.no_grad()
def errors(
    weights: Tensor, approx_fn, L: Tensor | None = None, lam: Tensor | None = None, *,
    chunk: int | None = None, device=None, compute_dtype: torch.dtype = _F64,
    whitened: tuple[float | None, float] | None = None,
) -> tuple[float, float | None]:
    """Relative weight error ``‖W − Ŵ‖/‖W‖`` and, with ``L``, relative output error on the
    calibration inputs ``sqrt(Σ tr(Δ_i G_i Δ_iᵀ) / Σ tr(W_i G_i W_iᵀ))``, computed from
    ``‖Δ_i L_i‖² − λ_i ‖Δ_i‖²`` (``Ĝ_i = G_i + λ_i I``).  ``approx_fn(slice) -> Ŵ[slice]``
    (on ``device``).  ``compute_dtype``: dtype of the whitened products (sums are float64).

    ``whitened = (Σ_i ‖Δ_i L_i‖², Σ_i ‖W_i L_i‖²)`` when the fit already knows both
    (:func:`fit_delta`'s ``info``): then no whitened product is computed (at real shapes they
    were a third of a layer's fit).  Where the error is below 10⁻³ of the total, the subtraction
    the fit's objective comes from (``‖RL‖² − Σσ²``) has lost too many digits, and the
    products are computed as without ``whitened``.  ``whitened = (None, Σ_i ‖W_i L_i‖²)``: only
    the total is known (the float fit's, for its quantized storage), so only ``Δ_i L_i`` is computed."""
    e = weights.shape[0]
    device = torch.device(device) if device is not None else weights.device
    direct = L is not None and (whitened is None or whitened[0] is None or whitened[0] < 1e-3 * whitened[1])
    total_only = whitened is not None and whitened[0] is None  # Σ‖W_i L_i‖² known, Δ's not
    wn = wd = on = od = lw_d = lw_w = 0.0
    for sl in chunks_of(e, chunk or e):
        w = weights[sl].to(device=device, dtype=compute_dtype)  # (n, d_out, d_in)
        delta = w - approx_fn(sl).to(compute_dtype)
        dw, ww = delta.pow(2).sum((1, 2), dtype=_F64), w.pow(2).sum((1, 2), dtype=_F64)  # (n,)
        wn, wd = wn + float(dw.sum()), wd + float(ww.sum())
        if L is not None:
            la = lam[sl].to(device=device, dtype=_F64)  # (n,)
            lw_d, lw_w = lw_d + float((la * dw).sum()), lw_w + float((la * ww).sum())
        if direct:
            l = L[sl].to(device=device, dtype=compute_dtype)
            on += float((lower_right(delta, l).pow(2).sum((1, 2), dtype=_F64) - la * dw).clamp_min(0).sum())
            if not total_only:
                od += float((lower_right(w, l).pow(2).sum((1, 2), dtype=_F64) - la * ww).clamp_min(0).sum())
    if total_only:
        od = max(whitened[1] - lw_w, 0.0)
    elif L is not None and not direct:  # Σ(‖Δ_i L_i‖² − λ_i‖Δ_i‖²), Σ(‖W_i L_i‖² − λ_i‖W_i‖²)
        on, od = max(whitened[0] - lw_d, 0.0), max(whitened[1] - lw_w, 0.0)
    weight_err = (wn / max(wd, 1e-300)) ** 0.5
    return weight_err, ((on / max(od, 1e-300)) ** 0.5 if L is not None else None)


@torch.no_grad()
def spectrum(weights: Tensor, core: Tensor, L: Tensor | None = None, *, chunk: int | None = None,
             device=None) -> tuple[Tensor, float]:
    """Singular values ``(E, min(d_out, d_in))`` of the (whitened) residuals ``(W_i − C) L_i``
    (the energy each delta rank unit can remove) and the total (whitened) energy
    ``Σ_i ‖W_i L_i‖²`` that normalizes them."""
    e = weights.shape[0]
    device = torch.device(device) if device is not None else weights.device
    core = core.to(device=device, dtype=_F64)
    out, total = [], 0.0
    for sl in chunks_of(e, chunk or e):
        w, l = _on(weights, sl, device), _on(L, sl, device)
        out.append(torch.linalg.svdvals(lower_right(w - core, l) if l is not None else w - core).cpu())
        total += float((lower_right(w, l) if l is not None else w).pow(2).sum())
    return torch.cat(out), total


def refine_delta(
    weights: Tensor, core: Tensor, rank: int, grams: Tensor | None = None, damping: float = 0.01,
    steps: int = 10, tol: float = 1e-4, method: str = "exact", generator: torch.Generator | None = None,
) -> tuple[Tensor, tuple[Tensor, Tensor], list[float]]:
    """:func:`fit_delta` on in-memory Grams ``(E, d_in, d_in)`` (whitened) or none (weight space):
    all experts in one chunk, on the weights' device."""
    L = K = None
    if grams is not None:
        L = grams.to(_F64).clone()
        K, _ = whiten_in_place(L, damping, L.shape[0], weights.device)
    return fit_delta(weights, core, rank, L, K, steps=steps, tol=tol, method=method, generator=generator)
