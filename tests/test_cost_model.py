"""The analytic cost model of ``benchmarks/scale.py`` against ``FlopCounterMode`` on one small
layer's fit (randomized and exact SVD paths), and the float32 fit against the float64 fit on
a random layer with a decaying spectrum (the bound of docs/DESIGN.md "Precision of the fit")."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from moecore import CompressionConfig
from moecore.calibration import RoutedInputs
from moecore.families import FUSED
from moecore.fitting import fit_experts
from moecore.maths import fit as mf

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


class _Experts(torch.nn.Module):
    """A fused experts module: ``gate_up_proj (E, 2F, H)``, ``down_proj (E, H, F)``."""

    def __init__(self, e: int, h: int, f: int):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.num_experts = e
        self.gate_up_proj = torch.nn.Parameter(torch.randn(e, 2 * f, h, generator=g) * h ** -0.5)
        self.down_proj = torch.nn.Parameter(torch.randn(e, h, f, generator=g) * f ** -0.5)
        self.act_fn = torch.nn.SiLU()


@pytest.fixture(scope="module")
def scale():
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("scale")
    finally:
        sys.path.remove(str(BENCH))


@pytest.mark.parametrize("steps", [2, 0])
@pytest.mark.parametrize("svd", ["randomized", "exact", "gram"])
def test_cost_model_matches_flop_counter(scale, svd, steps):
    e, h, f, k, t, rank = 4, 192, 96, 2, 512, 12
    mod = _Experts(e, h, f)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(t, h, generator=g)
    idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    inputs = RoutedInputs(x, idx, torch.rand(t, k, generator=g), e, "routing")
    cfg = CompressionConfig(form="delta", rank=rank, svd=svd, refine_steps=steps)  # the form the cost model counts
    with FlopCounterMode(display=False) as fc:
        new = fit_experts(mod, FUSED, cfg, {p: rank for p in ("gate", "up", "down")}, inputs, "cpu", 0)
    counted = fc.get_total_flops()
    passes = {p: 1 + new.report[p]["refine_iters"] for p in ("gate", "up", "down")}
    model = scale.layer_flops(e, h, f, k, t, {p: rank for p in passes}, passes, {p: svd for p in passes})
    print(svd, model["gemm"], counted)
    assert model["gemm"] == pytest.approx(counted, rel=0.05)


def _layer(e=6, d_out=96, d_in=160, seed=0):
    """Experts with a shared part and decaying spectra, and Grams of decaying-spectrum inputs."""
    g = torch.Generator().manual_seed(seed)
    decay = torch.logspace(0, -3, min(d_out, d_in), dtype=torch.float64)
    def lowrankish():
        u = torch.linalg.qr(torch.randn(d_out, d_out, generator=g, dtype=torch.float64)).Q[:, : decay.numel()]
        v = torch.linalg.qr(torch.randn(d_in, d_in, generator=g, dtype=torch.float64)).Q[:, : decay.numel()]
        return (u * decay) @ v.T
    base = lowrankish()
    w = torch.stack([base + 0.5 * lowrankish() for _ in range(e)])  # (E, d_out, d_in)
    x = torch.randn(e, 400, d_in, generator=g, dtype=torch.float64) * torch.logspace(0, -2, d_in, dtype=torch.float64)
    grams = x.mT @ x  # (E, d_in, d_in)
    return w.float(), grams


def test_float32_fit_matches_float64_within_bound():
    w, grams = _layer()
    rank = 20
    L = grams.clone()
    K, _ = mf.whiten_in_place(L, 0.01, L.shape[0], "cpu")
    core = mf.expert_core(w)
    out = {}
    for dt in (torch.float64, torch.float32):
        c, (a, b), hist = mf.fit_delta(w, core, rank, L, K, steps=3, tol=0.0, method="randomized",
                                       generator=torch.Generator().manual_seed(0), compute_dtype=dt)
        out[dt] = (c + a.double() @ b.double().mT, hist)
    (w64, h64), (w32, h32) = out[torch.float64], out[torch.float32]
    wl = (w.double() @ L).pow(2).sum()
    # bound (docs/DESIGN.md): √objective moves by at most 2δ per step, δ = γ_d Σ_i ‖R_i‖‖L_i‖ with
    # γ_d = d·u, u = 2⁻²⁴; on this layer that is below 1e-3 of ‖W L‖, and the fitted layers agree to it
    d, u = w.shape[-1], 2.0 ** -24
    delta = d * u * sum(float((w[i].double() - core).norm() * L[i].norm()) for i in range(w.shape[0]))
    assert delta / float(wl.sqrt()) < 1e-2
    for a64, a32 in zip(h64, h32):
        assert abs(a32 ** 0.5 - a64 ** 0.5) <= 2 * delta
    diff = float(((w32 - w64) @ L).pow(2).sum().sqrt())
    assert diff <= 2 * delta + 1e-3 * float(wl.sqrt())
    assert diff / float(wl.sqrt()) < 1e-3


def test_float32_gram_fit_matches_the_float64_exact_fit_within_bound():
    """``svd="gram"`` (real shapes: the top triplets from a float32 Gram's ``eigh``) against the
    float64 exact path, ragged ranks (cap 40) and uniform: every step's √objective within
    ``2δ + √(s·k·u)·Σ_i ‖R_i L_i‖₂`` (docs/DESIGN.md §3: the float32 products' ``δ`` plus the
    Gram's eigenvalue error ``s·k·u·σ₁²`` per expert), the fitted layers as close, and the
    ranks water-filled from float32 energies within one unit per expert of float64's."""
    w, grams = _layer()
    L = grams.clone()
    K, _ = mf.whiten_in_place(L, 0.01, L.shape[0], "cpu")
    core = mf.expert_core(w)
    d, u, k = w.shape[-1], 2.0 ** -24, min(w.shape[1:])
    wl = float((w.double() @ L).pow(2).sum().sqrt())
    for cap, rank in ((None, 20), (40, 20)):
        out = {}
        for method in ("exact", "gram"):
            c, fac, hist = mf.fit_delta(w, core, rank, L, K, steps=3, tol=0.0, method=method, rank_cap=cap,
                                        compute_dtype=mf.compute_dtype(method))
            out[method] = (c + fac[0].double() @ fac[1].double().mT, hist, fac[2] if cap else None)
        r = w.double() - core
        delta = d * u * sum(float(r[i].norm() * L[i].norm()) for i in range(w.shape[0]))
        gram = (cap or rank) * k * u * sum(float(torch.linalg.matrix_norm(r[i] @ L[i], 2)) ** 2
                                           for i in range(w.shape[0]))
        bound = 2 * delta + gram ** 0.5
        assert bound < 1e-2 * wl
        for a64, a32 in zip(out["exact"][1], out["gram"][1]):
            assert abs(a32 ** 0.5 - a64 ** 0.5) <= bound, (a32, a64, bound)
        diff = float(((out["gram"][0] - out["exact"][0]) @ L).pow(2).sum().sqrt())
        assert diff / wl < 2e-3
        if cap:
            assert (out["gram"][2] - out["exact"][2]).abs().max() <= 1 and out["gram"][2].sum() == out["exact"][2].sum()


def test_float32_whitening_perturbs_the_objective_within_bound():
    """Grams stored in float32 (real shapes) are factored in float32: each factor's relative
    perturbation of the whitened objective, ``ρ_i = ‖L_i⁻¹ (L̃_i L̃_iᵀ − Ĝ_i) L_i⁻ᵀ‖₂``, is
    within the bound of docs/DESIGN.md ``2·γ_{d+1}·‖Ĝ_i‖₂ / λ_i`` (the float32 rounding of the
    Gram plus the Cholesky's backward error), and a gram-path fit on the float32 factors lands
    within ``(1+ρ)/(1−ρ)`` of the one on float64 factors, measured in the exact metric."""
    w, grams = _layer(d_in=320)
    L64 = grams.clone()
    K64, lam = mf.whiten_in_place(L64, 0.01, L64.shape[0], "cpu")
    L32 = grams.float()
    K32, lam32 = mf.whiten_in_place(L32, 0.01, 2, "cpu")  # float32 factors, two experts per chunk
    assert L32.dtype == torch.float32 and torch.allclose(lam, lam32, rtol=1e-6)  # λ of the rounded Grams
    d, u = grams.shape[-1], 2.0 ** -24
    rho = []
    for i in range(grams.shape[0]):
        g_hat = L64[i] @ L64[i].mT  # Ĝ_i
        e = L32[i].double() @ L32[i].double().mT - g_hat
        inv = torch.linalg.inv(L64[i])
        rho.append(float(torch.linalg.matrix_norm(inv @ e @ inv.mT, 2)))
        bound = 2 * (d + 1) * u / (1 - (d + 1) * u) * float(torch.linalg.matrix_norm(g_hat, 2)) / float(lam[i])
        assert rho[-1] <= bound, (i, rho[-1], bound)
        assert not torch.equal(L32[i].double(), L64[i])  # factored in float32, not a rounded float64 factor
    r = max(rho)
    assert r < 0.05
    core = mf.expert_core(w)
    fits = {}
    for name, (L, K) in {"64": (L64, K64), "32": (L32, K32)}.items():
        c, (a, b), _ = mf.fit_delta(w, core, 20, L, K, steps=3, tol=0.0, method="gram", compute_dtype=torch.float32)
        delta = w.double() - (c + a.double() @ b.double().mT)
        fits[name] = float((delta @ L64).pow(2).sum())  # the exact whitened objective
    assert fits["32"] <= (1 + r) / (1 - r) * fits["64"] * (1 + 1e-3), fits


@pytest.mark.parametrize("method,cap", [("exact", None), ("randomized", None), ("gram", None), ("exact", 40),
                                        ("randomized", 40), ("gram", 40)])
def test_report_errors_from_the_fit_match_the_products(method, cap):
    """The fit report's output error, from the fit's own sums (no whitened product), equals
    the one computed from ``Δ_i L_i`` and ``W_i L_i`` (delta and, with a cap, ragged ranks)."""
    w, grams = _layer()
    L = grams.clone()
    K, lam = mf.whiten_in_place(L, 0.01, L.shape[0], "cpu")
    info: dict = {}
    dt = mf.compute_dtype(method)
    c, fac, hist = mf.fit_delta(w, mf.expert_core(w), 20, L, K, steps=3, method=method, compute_dtype=dt,
                                generator=torch.Generator().manual_seed(0), rank_cap=cap, info=info)
    pair = info.get("whitened")
    assert pair is not None and pair[0] == min(hist)
    approx = lambda sl: c + fac[0][sl].double() @ fac[1][sl].double().mT  # noqa: E731
    assert pair[1] == pytest.approx(float((w.double() @ L).pow(2).sum()), rel=1e-6)
    assert pair[0] == pytest.approx(float(((w.double() - approx(slice(None))) @ L).pow(2).sum()), rel=1e-4)
    direct = mf.errors(w, approx, L, lam, compute_dtype=torch.float64)
    fast = mf.errors(w, approx, L, lam, compute_dtype=torch.float64, whitened=pair)
    assert fast[0] == direct[0]
    assert 0.01 < direct[1] < 0.9 and fast[1] == pytest.approx(direct[1], rel=1e-4)
    # no refinement step: the first pass still accumulates P, so the fit knows Σ‖W_i L_i‖² too
    info = {}
    c0, fac0, hist0 = mf.fit_delta(w, mf.expert_core(w), 20, L, K, steps=0, method=method, compute_dtype=dt,
                                   generator=torch.Generator().manual_seed(0), rank_cap=cap, info=info)
    assert info["whitened"][0] == hist0[0] and info["whitened"][1] == pytest.approx(pair[1], rel=1e-9)
    approx0 = lambda sl: c0 + fac0[0][sl].double() @ fac0[1][sl].double().mT  # noqa: E731
    assert mf.errors(w, approx0, L, lam, compute_dtype=torch.float64, whitened=info["whitened"])[1] == \
        pytest.approx(mf.errors(w, approx0, L, lam, compute_dtype=torch.float64)[1], rel=1e-4)


def test_auto_svd_takes_the_gram_where_the_width_is_a_quarter_of_the_short_side():
    """``svd="auto"`` at the real shapes, 25% of the expert parameters: Qwen3-30B-A3B (short side
    768, ragged width 2 × 135) and DeepSeek-V3 (2048, 2 × 392) take the float32 Gram path,
    Mixtral-8x7B (4096, 2 × 398) the randomized one, the bundled models' shapes the float64 exact one."""
    from moecore.fitting import svd_method
    from moecore.forms import get_form

    cfg = CompressionConfig()
    ragged, delta = get_form("ragged"), get_form("delta")
    assert svd_method(cfg, 768, 2048, ragged.svd_width(135)) == svd_method(cfg, 2048, 768, 270) == "gram"
    assert svd_method(cfg, 2048, 7168, ragged.svd_width(392)) == "gram"
    assert svd_method(cfg, 14336, 4096, ragged.svd_width(398)) == "randomized"
    assert svd_method(cfg, 768, 2048, delta.svd_width(135)) == "randomized"  # 4 × (135 + 8) = 572 < 768
    assert svd_method(cfg, 768, 2048, 100) == "randomized" and svd_method(cfg, 768, 2048) == "randomized"
    assert svd_method(cfg, 96, 256, 512) == "exact" and svd_method(CompressionConfig(svd="randomized"), 768, 2048, 270) == "randomized"
