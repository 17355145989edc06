"""Pure tensor maths of the shared-core decomposition (no modules, no hooks, no I/O).

Conventions: one projection of one layer holds the stacked expert weights
``W (E, d_out, d_in)`` (y = W_i x).  ``G (E, d_in, d_in)`` are per-expert input Gram
matrices ``X_iᵀ X_i`` of calibration inputs; whitening minimizes the output error
``Σ_i ‖(W_i − Ŵ_i) X_iᵀ‖_F² = Σ_i tr(Δ_i G_i Δ_iᵀ)`` instead of ``‖W_i − Ŵ_i‖_F²``.

Delta form:   W_i ≈ C + A_i B_iᵀ,          A (E, d_out, s), B (E, d_in, s)
Wrapper form: W_i ≈ (I + U_o V_oᵀ) C (I + U_i V_iᵀ),
              U_o, V_o (E, d_out, r), U_i, V_i (E, d_in, r)
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

Tensor = torch.Tensor


# ---------------------------------------------------------------------------- SVD
@contextlib.contextmanager
def one_thread(t: Tensor) -> Iterator[None]:
    """Run the enclosed LAPACK factorizations (QR, SVD, eigh) of CPU tensor ``t`` on one thread.

    MKL's multi-threaded QR / SVD / eigh of small and medium matrices gain nothing on few
    cores and lose up to 10-17x in CPU time when the cores are shared (threads spin-wait):
    measured on the 2-core machine of benchmarks/RESULTS.md §7 (``qr`` of (16, 2048, 143):
    116 ms on 1 thread against 2,007 ms on 2; ``svd`` of (16, 143, 2048): 405 against 3,636 ms;
    ``eigh`` of (8, 256, 256) float64: 64 against 453 ms).  Matrix products keep all threads."""
    if t.device.type != "cpu" or torch.get_num_threads() == 1:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def truncated_svd(
    m: Tensor, rank: int, method: str = "exact", oversample: int = 8, power_iters: int = 4,
    generator: torch.Generator | None = None, init: Tensor | None = None, warm_power_iters: int = 1,
) -> tuple[Tensor, Tensor, Tensor]:
    """Rank-``rank`` truncated SVD of a (batch of) matrix ``m (..., a, b)``.

    Returns ``U (..., a, s), S (..., s), V (..., b, s)`` with ``m ≈ U diag(S) Vᵀ`` and
    ``s = rank`` (zero-padded if ``rank > min(a, b)``).  ``method="gram"``: the exact top ``s``
    from the smaller Gram in ``m``'s own precision (:func:`gram_svd`).  ``method="randomized"`` uses a
    Gaussian range finder with ``oversample`` extra columns and ``power_iters``
    subspace iterations (Halko et al.), exact when ``rank + oversample >= min(a, b)``.
    ``init (..., b, s)``: right singular vectors of a nearby matrix (the previous refinement
    step's); they replace the first ``s`` Gaussian columns and ``warm_power_iters`` subspace
    iterations are run instead of ``power_iters`` (a warm start).  In every case
    ``U diag(S) Vᵀ = U Uᵀ m`` is an orthogonal projection of ``m``.
    """
    a, b = m.shape[-2], m.shape[-1]
    k = min(a, b)
    s = min(rank, k)
    if method == "randomized" and s + oversample < k:
        omega = torch.randn(*m.shape[:-2], b, s + oversample, dtype=m.dtype, device=m.device, generator=generator)
        if init is not None and init.shape[-1] >= s:
            warm = init[..., :s].to(omega)  # warm start from the previous subspace
            omega[..., :s] = torch.where(warm.norm(dim=-2, keepdim=True) > 0, warm, omega[..., :s])  # (zero: Gaussian)
            power_iters = warm_power_iters
        q = _qr(m @ omega)  # (..., a, s+p)
        for _ in range(power_iters):
            q = _qr(m.mT @ q)  # (..., b, s+p)
            q = _qr(m @ q)  # (..., a, s+p)
        ub, sv, vh = _short_svd(q.mT @ m)  # of (..., s+p, b): (..., s+p, s+p), (..., s+p), (..., s+p, b)
        u = q @ ub  # (..., a, s+p)
    elif method == "gram":  # exact top-s from the smaller Gram, in m's precision (the bound: gram_svd)
        fa, fb, _ = gram_svd(m, s)  # (..., a, s) = U√σ, (..., b, s) = V√σ
        sv = fa.norm(dim=-2) * fb.norm(dim=-2)  # (..., s) σ, 0 where dropped
        root = torch.where(sv > 0, sv, torch.ones_like(sv)).sqrt().unsqueeze(-2)  # (..., 1, s)
        u, v = fa / root, fb / root
    elif method in ("exact", "randomized"):
        with one_thread(m):
            u, sv, vh = torch.linalg.svd(m, full_matrices=False)  # (..., a, k), (..., k), (..., k, b)
    else:
        raise ValueError(f"unknown svd method {method!r}")
    if method != "gram":
        u, sv, v = u[..., :s], sv[..., :s], vh[..., :s, :].mT  # (..., a, s), (..., s), (..., b, s)
    if rank > s:  # pad with zero directions so factor shapes stay fixed
        pad = rank - s
        u = torch.nn.functional.pad(u, (0, pad))
        v = torch.nn.functional.pad(v, (0, pad))
        sv = torch.nn.functional.pad(sv, (0, pad))
    return u, sv, v


def _qr(m: Tensor) -> Tensor:
    """Orthonormal basis ``Q (..., a, c)`` of the columns of ``m (..., a, c)`` (one thread)."""
    with one_thread(m):
        return torch.linalg.qr(m).Q


def _short_svd(m: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """SVD ``U (..., c, c), S (..., c), Vᵀ (..., c, b)`` of a short, wide ``m (..., c, b)`` from
    the eigendecomposition of ``m mᵀ`` (float64, ``c × c``): two products and one small ``eigh``
    instead of LAPACK's bidiagonalization of the whole ``m`` on one thread (1.5-8.5x faster at
    real layer shapes, benchmarks/svd_cost.py).  ``σ_j²`` are exact
    to ``O(u₆₄·σ_1²)``; a right vector ``v_j = mᵀu_j/σ_j`` to ``O(u₆₄·σ_1²/σ_j²)``, and
    directions with ``σ_j ≤ 10⁻⁷σ_1`` (below float32 resolution) are returned as zero, so
    ``U diag(S) Vᵀ`` stays the projection ``U Uᵀ m`` on the rest."""
    m64 = m.to(torch.float64)
    with one_thread(m):
        lam, u = torch.linalg.eigh(m64 @ m64.mT)  # ascending (..., c), (..., c, c)
    lam, u = lam.flip(-1).clamp_min(0), u.flip(-1)
    sv = lam.sqrt()  # (..., c)
    keep = sv > 1e-7 * sv[..., :1]
    vh = (u.mT @ m64) / torch.where(keep, sv, torch.ones_like(sv)).unsqueeze(-1)  # (..., c, b)
    vh = vh * keep.unsqueeze(-1)
    return u.to(m.dtype), (sv * keep).to(m.dtype), vh.to(m.dtype)


def gram_svd(m: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """Balanced rank-``rank`` factors of ``m (..., a, b)`` from the symmetric eigendecomposition
    of its smaller Gram (``mᵀm (b, b)`` or ``m mᵀ (a, a)``), much faster than a full SVD.

    Returns ``A (..., a, s), B (..., b, s)`` with ``A Bᵀ = m V Vᵀ`` (or ``U Uᵀ m``), the
    orthogonal projection onto the top-``s`` right (left) singular subspace, balanced as
    :func:`split_sqrt` (``A = U√S``, ``B = V√S``), and the kept energy ``Σ σ_j² (...)``.
    Zero-padded above ``min(a, b)``; directions with ``σ_j ≤ τ σ_1`` are dropped (``τ = 1e-12``
    in float64, ``√u`` in a lower precision: below that a Gram's eigenvalue is rounding).

    Accuracy: the eigenvalues of the Gram are ``σ_j²`` up to ``O(k·u·σ_1²)`` (``k`` its size),
    so the kept energy and the projection's error ``‖m‖² − Σσ_j²`` are exact to
    ``O(s·k·u·σ_1²)`` (``u = 2⁻⁵³``, or ``2⁻²⁴`` for a float32 ``m``: the fit's "gram" path at
    real shapes, docs/DESIGN.md §3); whatever the eigenvectors' error, ``A Bᵀ = U Uᵀ m`` stays an
    orthogonal projection of ``m`` (``U`` orthonormal from ``eigh``), so the error never exceeds
    ``‖m‖²``'s and the objective is quadratic, hence insensitive, in subspace errors.
    """
    a, b = m.shape[-2], m.shape[-1]
    k = min(a, b)
    s = min(rank, k)
    tall = a >= b
    g = m.mT @ m if tall else m @ m.mT  # (..., k, k)
    with one_thread(g):
        lam, vec = torch.linalg.eigh(g)  # ascending
    lam = lam[..., -s:].flip(-1).clamp_min(0)  # (..., s) = σ²
    vec = vec[..., -s:].flip(-1)  # (..., k, s)
    sig = lam.sqrt()
    tau = 1e-12 if m.dtype == torch.float64 else torch.finfo(m.dtype).eps ** 0.5
    keep = sig > tau * sig[..., :1].clamp_min(1e-300)
    root = torch.where(keep, sig, torch.ones_like(sig)).sqrt().unsqueeze(-2)  # (..., 1, s)
    vec = vec * keep.unsqueeze(-2)
    other = (m @ vec if tall else m.mT @ vec) / root  # m V / √σ = U√σ   (..., a, s) or (..., b, s)
    mine = vec * root  # V√σ
    fa, fb = (other, mine) if tall else (mine, other)
    if rank > s:
        fa = torch.nn.functional.pad(fa, (0, rank - s))
        fb = torch.nn.functional.pad(fb, (0, rank - s))
    return fa, fb, (lam * keep).sum(-1)


def split_sqrt(u: Tensor, sv: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Balanced factors ``(U√S, V√S)`` of ``U diag(S) Vᵀ``."""
    r = sv.clamp_min(0).sqrt().unsqueeze(-2)  # (..., 1, s)
    return u * r, v * r


# ---------------------------------------------------------------------------- whitening
def damped_grams(grams: Tensor, damping: float = 0.01) -> tuple[Tensor, Tensor]:
    """``Ĝ_i = G_i + λ_i·I`` with ``λ_i = (damping + 1e-10)·mean(diag G_i)`` per expert, in float64.

    Experts whose Gram is zero (never routed) get ``Ĝ_i = (1 + λ)·I`` (plain, weight-space
    SVD).  ``grams (E, d, d) -> Ĝ (E, d, d), λ (E,)``.
    """
    g = grams.to(torch.float64, copy=True)  # (E, d, d), a copy modified in place below
    diag = torch.diagonal(g, dim1=-2, dim2=-1)  # (E, d) a view
    mean_diag = diag.mean(-1)  # (E,)
    dead = mean_diag <= 0
    scale = torch.where(dead, torch.ones_like(mean_diag), mean_diag)
    if bool(dead.any()):
        g[dead] = torch.eye(g.shape[-1], dtype=g.dtype, device=g.device)
    lam = damping * scale + 1e-10 * scale  # (E,)
    diag.add_(lam[:, None])  # only the diagonal is touched: O(E·d), not O(E·d²)
    return g, lam


def whitening_factor(grams: Tensor, damping: float = 0.01) -> Tensor:
    """Lower Cholesky factor ``L (E, d, d)`` of ``Ĝ_i`` (:func:`damped_grams`) per expert,
    in the dtype of ``grams``.  Experts whose Gram is zero (never routed) get ``L ∝ I``."""
    g, lam = damped_grams(grams, damping)  # (E, d, d), (E,)
    L, info = torch.linalg.cholesky_ex(g)
    if bool((info != 0).any()):  # numerically indefinite: fall back to a stronger ridge
        eye = torch.eye(g.shape[-1], dtype=g.dtype, device=g.device)
        L = torch.linalg.cholesky(g + (1e-4 * lam)[:, None, None] * eye)
    return L.to(grams.dtype)  # (E, d, d)


def solve_lt(L: Tensor, rhs: Tensor) -> Tensor:
    """``L⁻ᵀ rhs`` for lower-triangular ``L (E, d, d)``, ``rhs (E, d, s)``."""
    return torch.linalg.solve_triangular(L.mT, rhs, upper=True)


# ---------------------------------------------------------------------------- delta form
def delta_factors(
    weights: Tensor, core: Tensor, rank: int, method: str = "exact", generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Plain delta factors: truncated SVD of the residuals ``R_i = W_i − C``.

    ``weights (E, d_out, d_in), core (d_out, d_in) -> A (E, d_out, s), B (E, d_in, s)``;
    the best rank-s approximation in Frobenius norm (Eckart–Young).
    """
    resid = weights - core  # (E, d_out, d_in)
    u, sv, v = truncated_svd(resid, rank, method, generator=generator)
    return split_sqrt(u, sv, v)


def whitened_delta_factors(
    weights: Tensor, core: Tensor, rank: int, grams: Tensor, damping: float = 0.01,
    method: str = "exact", generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Activation-whitened delta factors (SVD-LLM): minimize ``‖(R_i − A_i B_iᵀ) L_i‖_F``
    with ``L_i L_iᵀ = G_i + damping·mean(diag G_i)·I``, in closed form.

    SVD of ``R_i L_i = U S Vᵀ`` truncated to s; ``A_i = U√S``, ``B_i = L_i⁻ᵀ V√S`` (a
    triangular solve), so ``A_i B_iᵀ L_i = U S Vᵀ``.  ``grams (E, d_in, d_in)``.
    """
    return whitened_factors_l(weights, core, rank, whitening_factor(grams, damping), method, generator)


def whitened_factors_l(
    weights: Tensor, core: Tensor, rank: int, L: Tensor, method: str, generator: torch.Generator | None,
) -> tuple[Tensor, Tensor]:
    """:func:`whitened_delta_factors` for a precomputed whitening factor ``L (E, d_in, d_in)``."""
    resid = weights - core  # (E, d_out, d_in)
    u, sv, v = truncated_svd(resid @ L, rank, method, generator=generator)  # (E,d_out,s) (E,s) (E,d_in,s)
    a, bw = split_sqrt(u, sv, v)
    return a, solve_lt(L, bw)  # (E, d_out, s), (E, d_in, s)


def reconstruct_delta(core: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``C + A_i B_iᵀ``: ``(d_out, d_in), (E, d_out, s), (E, d_in, s) -> (E, d_out, d_in)``."""
    return core + a @ b.mT


# ---------------------------------------------------------------------------- wrapper form
def _reduced_rank_left(target: Tensor, m: Tensor, rank: int, rcond: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Best rank-r ``P = X Yᵀ`` minimizing ``‖target − P m‖_F`` per batch item.

    ``target (E, a, n), m (E, b, n) -> X (E, a, r), Y (E, b, r)``.  With ``m = U Σ Vᵀ``:
    ``P = trunc_r(target V) Σ⁻¹ Uᵀ`` (directions with σ < rcond·σ_max are dropped).
    """
    u, sig, vh = torch.linalg.svd(m, full_matrices=False)  # (E,b,k) (E,k) (E,k,n)
    keep = sig > rcond * sig[..., :1]
    inv = torch.where(keep, 1.0 / torch.where(keep, sig, torch.ones_like(sig)), torch.zeros_like(sig))  # (E, k)
    q = target @ vh.mT  # (E, a, k)
    uq, sq, vq = truncated_svd(q, rank)  # (E,a,r) (E,r) (E,k,r)
    x, vqs = split_sqrt(uq, sq, vq)  # (E, a, r), (E, k, r)
    y = u @ (inv.unsqueeze(-1) * vqs)  # (E, b, r)
    return x, y


def _apply_lowrank(m: Tensor, u: Tensor, v: Tensor, side: str) -> Tensor:
    """``(I + U Vᵀ) m`` (side="left") or ``m (I + U Vᵀ)`` (side="right")."""
    if side == "left":
        return m + u @ (v.mT @ m)
    return m + (m @ u) @ v.mT


def reconstruct_wrapper(core: Tensor, u_in: Tensor, v_in: Tensor, u_out: Tensor, v_out: Tensor) -> Tensor:
    """``(I + U_o V_oᵀ) C (I + U_i V_iᵀ)`` -> ``(E, d_out, d_in)``."""
    e = u_in.shape[0]
    inner = _apply_lowrank(core.expand(e, *core.shape), u_in, v_in, "right")  # (E, d_out, d_in)
    return _apply_lowrank(inner, u_out, v_out, "left")


def wrapper_factors(
    weights: Tensor, core: Tensor, rank: int, grams: Tensor | None = None, damping: float = 0.01,
    steps: int = 50, tol: float = 1e-4, whitening: Tensor | None = None,
) -> tuple[tuple[Tensor, Tensor, Tensor, Tensor], list[float]]:
    """Wrapper factors by closed-form start + alternating least squares (ALS).

    Objective: ``Σ_i ‖(W_i − Ŵ_i) L_i‖_F²`` with ``L_i = I`` (weight space) or the whitening
    factor of ``grams`` (output space).  Each half-step is an exact reduced-rank regression:

    * output side (input side fixed): ``min_P ‖W L − (I+P) M‖`` with ``M = C(I+N)L``;
    * input side (output side fixed): in whitened coordinates ``Ñ = L⁻¹ N L``,
      ``min_Ñ ‖W L − M (I+Ñ)‖`` with ``M = (I+P) C L``, then ``U_i = L·X``, ``V_i = L⁻ᵀ·Y``.

    The start (iteration 0) is the output-side solution with N = 0, i.e. the truncation of
    ``(W_i − C) C⁺``, followed by the input side.  At ``r = min(d_in, d_out)`` the start is
    exact when C has full rank.  The best iterate is returned, so the error never increases
    over the start; iteration stops when the relative improvement is below ``tol``.

    ``whitening (E, d_in, d_in)``: a precomputed whitening factor, used instead of ``grams``.

    Returns ``(u_in (E,d_in,r), v_in (E,d_in,r), u_out (E,d_out,r), v_out (E,d_out,r))`` and
    the objective history (one value per iteration).
    """
    e, d_out, d_in = weights.shape
    dt = weights.dtype
    L = whitening_factor(grams, damping) if grams is not None else whitening  # (E, d_in, d_in)
    c = core.expand(e, d_out, d_in)  # (E, d_out, d_in)
    wl = weights @ L if L is not None else weights  # (E, d_out, d_in)
    u_in = torch.zeros(e, d_in, rank, dtype=dt, device=weights.device)
    v_in = torch.zeros_like(u_in)
    u_out = torch.zeros(e, d_out, rank, dtype=dt, device=weights.device)
    v_out = torch.zeros_like(u_out)

    def whiten(m: Tensor) -> Tensor:
        return m @ L if L is not None else m

    def objective() -> float:
        return float((wl - whiten(reconstruct_wrapper(core, u_in, v_in, u_out, v_out))).pow(2).sum())

    history: list[float] = []
    best, best_err = None, float("inf")
    for _ in range(max(1, steps + 1)):
        m = whiten(_apply_lowrank(c, u_in, v_in, "right"))  # (E, d_out, d_in)
        u_out, v_out = _reduced_rank_left(wl - m, m, rank)  # (E, d_out, r) x2
        m = whiten(_apply_lowrank(c, u_out, v_out, "left"))  # (E, d_out, d_in)
        # min_Ñ ‖T − M Ñ‖ == transpose of the left problem: Ñᵀ = X Yᵀ  ->  Ñ = Y Xᵀ
        x, y = _reduced_rank_left((wl - m).mT, m.mT, rank)  # (E, d_in, r) x2
        if L is not None:
            u_in, v_in = L @ y, solve_lt(L, x)
        else:
            u_in, v_in = y, x
        err = objective()
        history.append(err)
        if err < best_err:
            improved = best_err - err
            best_err, best = err, (u_in, v_in, u_out, v_out)
            if improved <= tol * max(err, 1e-30):
                break
        else:
            break
    return best, history


# ---------------------------------------------------------------------------- errors
def relative_weight_error(weights: Tensor, approx: Tensor) -> float:
    """``‖W − Ŵ‖_F / ‖W‖_F`` over all experts of a projection."""
    weights, approx = weights.detach(), approx.detach()
    num = (weights - approx).double().pow(2).sum()
    den = weights.double().pow(2).sum().clamp_min(1e-300)
    return float((num / den).sqrt())


def relative_output_error(weights: Tensor, approx: Tensor, grams: Tensor) -> float:
    """Relative output error on calibration inputs:
    ``sqrt(Σ_i tr(Δ_i G_i Δ_iᵀ) / Σ_i tr(W_i G_i W_iᵀ)) = ‖(W − Ŵ)X‖ / ‖W X‖``."""
    weights, approx = weights.detach(), approx.detach()
    g = grams.detach().double()  # (E, d_in, d_in)
    delta = (weights - approx).double()  # (E, d_out, d_in)
    w = weights.double()
    num = ((delta @ g) * delta).sum()
    den = ((w @ g) * w).sum().clamp_min(1e-300)
    return float((num.clamp_min(0) / den).sqrt())


def residual_spectrum(weights: Tensor, core: Tensor, grams: Tensor | None = None, damping: float = 0.01) -> Tensor:
    """Singular values ``(E, min(d_out, d_in))`` of the residuals ``W_i − C`` (whitened by
    ``L_i`` when ``grams`` is given): the energy that each delta rank unit can remove."""
    resid = weights - core  # (E, d_out, d_in)
    if grams is not None:
        resid = resid @ whitening_factor(grams, damping)
    return torch.linalg.svdvals(resid)
