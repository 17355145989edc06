"""Pure maths of moecore: exactness at full rank, Eckart–Young error, whitening, wrapper ALS,
budgets, and the config's validation/serialisation.  All float64, all numbers asserted."""
from __future__ import annotations

import json

import pytest
import torch

from moecore.config import CONFIG_FILENAME, CompressionConfig
from moecore.errors import ConfigError
from moecore.maths import budget
from moecore.maths import decompose as dm
from moecore.maths import fit

F64 = torch.float64
SHAPES = [(24, 16), (16, 24)]  # d_out > d_in and d_in > d_out


def _experts(e=4, d_out=24, d_in=16, shared=0.0):
    torch.manual_seed(0)
    base = torch.randn(d_out, d_in, dtype=F64)
    return shared * base + torch.randn(e, d_out, d_in, dtype=F64)  # (E, d_out, d_in)


def _grams(e, d_in, n=200):
    """Anisotropic calibration inputs so that whitening matters."""
    scale = torch.logspace(0, -2, d_in, dtype=F64)
    x = torch.randn(e, n, d_in, dtype=F64) * scale  # (E, n, d_in)
    return x, x.mT @ x  # (E, d_in, d_in)


def test_core_mean_and_frequency():
    w = _experts()
    assert torch.allclose(fit.expert_core(w), w.mean(0))
    f = torch.tensor([3.0, 1.0, 0.0, 0.0])
    assert torch.allclose(fit.expert_core(w, f), 0.75 * w[0] + 0.25 * w[1])
    assert torch.allclose(fit.expert_core(w, torch.zeros(4)), w.mean(0))  # no hits: plain mean


def test_output_core_is_the_output_error_optimum_and_generalizes_frequency():
    w = _experts(shared=1.0)
    x, g = _grams(4, 16)
    c = fit.output_core(w, g, damping=0.0)  # (d_out, d_in)

    def err(core):
        return float(((w - core) @ x.mT).pow(2).sum())  # Σ_i ‖(W_i − C) X_iᵀ‖²

    base = err(c)
    for probe in (fit.expert_core(w), c + 1e-3 * torch.randn_like(c), fit.expert_core(w, torch.tensor([4.0, 3, 2, 1]))):
        assert base < err(probe)
    # same input distribution for every expert (G_i = n_i G): the frequency-weighted mean
    n = torch.tensor([3.0, 1.0, 2.0, 0.0], dtype=F64)
    shared = n[:, None, None] * g[0]
    assert torch.allclose(fit.output_core(w, shared, damping=0.0), fit.expert_core(w, n), atol=1e-8)
    assert torch.allclose(fit.output_core(w, torch.zeros_like(g)), w.mean(0))  # no hits: plain mean


@pytest.mark.parametrize("grams", [False, True])
def test_delta_refinement_descends_and_is_exact_at_full_rank(grams):
    w = _experts(shared=1.0)
    g = _grams(4, 16)[1] if grams else None
    lw = dm.whitening_factor(g) if grams else torch.eye(16, dtype=F64)
    start = fit.expert_core(w)
    core, (a, b), hist = fit.refine_delta(w, start, 3, g, steps=25, tol=0.0)
    assert len(hist) == 26 and all(h2 <= h1 * (1 + 1e-12) for h1, h2 in zip(hist, hist[1:]))  # monotone
    assert hist[-1] < 0.97 * hist[0]  # the core moved usefully
    final = float(((w - dm.reconstruct_delta(core, a, b)) @ lw).pow(2).sum())
    assert abs(final - min(hist)) < 1e-9 * min(hist)  # best iterate returned
    fac0 = dm.whitened_delta_factors(w, start, 3, g) if grams else dm.delta_factors(w, start, 3)
    assert abs(hist[0] - float(((w - dm.reconstruct_delta(start, *fac0)) @ lw).pow(2).sum())) < 1e-9 * hist[0]
    core, fac, _ = fit.refine_delta(w, start, 16, g, steps=3)
    assert dm.relative_weight_error(w, dm.reconstruct_delta(core, *fac)) < 1e-12


def _whitened(g):
    L = g.clone()
    K, lam = fit.whiten_in_place(L, 0.01, L.shape[0], "cpu")
    return L, K, lam


@pytest.mark.parametrize("rank_cap", [None, 6])
def test_fit_delta_without_refinement_still_reports_the_whitened_totals(rank_cap):
    """refine_steps=0: the first pass also gives errors() its Σ‖Δ_i L_i‖² and Σ‖W_i L_i‖²
    (without them the report recomputes every whitened product), equal to the direct sums."""
    w = _experts(shared=1.0)
    L, K, _ = _whitened(_grams(4, 16)[1])
    info: dict = {}
    core, fac, hist = fit.fit_delta(w, fit.expert_core(w), 3, L, K, steps=0, rank_cap=rank_cap, info=info)
    assert len(hist) == 1 and torch.equal(core, fit.expert_core(w))
    err, total = info["whitened"]
    direct = float(((w - dm.reconstruct_delta(core, *fac[:2])) @ L).pow(2).sum())
    assert err == pytest.approx(direct, rel=1e-9) and err == pytest.approx(hist[0], rel=1e-12)
    assert total == pytest.approx(float((w @ L).pow(2).sum()), rel=1e-9)


def test_fit_delta_returns_the_best_iterate_without_keeping_a_copy_of_it(monkeypatch):
    """Only the best core is kept between steps; where the last step did worse (here an injected
    fault: step 1's SVD returns nothing), the best core's factors are computed again, and they
    are bit for bit those of the pass that first found them."""
    w = _experts(shared=1.0)
    L, K, _ = _whitened(_grams(4, 16)[1])
    start = fit.expert_core(w)
    first_core, first_fac, first_hist = fit.fit_delta(w, start, 3, L, K, steps=0)
    calls = []
    real = fit.gram_svd

    def faulty(rl, width):
        calls.append(width)
        a, bw, kept = real(rl, width)
        if len(calls) == 2:  # the refinement step's factor pass: no components at all
            return torch.zeros_like(a), torch.zeros_like(bw), torch.zeros_like(kept)
        return a, bw, kept
    monkeypatch.setattr(fit, "gram_svd", faulty)
    info: dict = {}
    core, fac, hist = fit.fit_delta(w, start, 3, L, K, steps=1, tol=0.0, info=info)
    assert len(calls) == 3  # first pass, the faulty step, the best core's factors again
    assert len(hist) == 2 and hist[1] > hist[0] == first_hist[0]
    assert torch.equal(core, first_core) and all(torch.equal(x, y) for x, y in zip(fac, first_fac))
    assert info["whitened"][0] == hist[0]


@pytest.mark.parametrize("d_out,d_in", SHAPES)
def test_full_rank_is_exact_for_every_form(d_out, d_in):
    w = _experts(d_out=d_out, d_in=d_in)
    c = fit.expert_core(w)
    s = min(d_out, d_in)
    _, g = _grams(4, d_in)
    assert dm.relative_weight_error(w, dm.reconstruct_delta(c, *dm.delta_factors(w, c, s))) < 1e-12
    assert dm.relative_weight_error(w, dm.reconstruct_delta(c, *dm.whitened_delta_factors(w, c, s, g))) < 1e-10
    for grams in (None, g):
        fac, _ = dm.wrapper_factors(w, c, s, grams, steps=2)
        assert dm.relative_weight_error(w, dm.reconstruct_wrapper(c, *fac)) < 1e-10
    # one-sided closed form from the brief: W = (I + (W−C)C⁺) C when C has full column rank
    if d_out >= d_in:
        rebuilt = c + (w - c) @ torch.linalg.pinv(c) @ c
        assert dm.relative_weight_error(w, rebuilt) < 1e-10


@pytest.mark.parametrize("s", [1, 4, 9])
def test_delta_error_is_discarded_singular_energy(s):
    w = _experts(shared=1.0)
    c = fit.expert_core(w)
    err = dm.relative_weight_error(w, dm.reconstruct_delta(c, *dm.delta_factors(w, c, s)))
    sv = torch.linalg.svdvals(w - c)  # (E, k)
    expected = (sv[:, s:].pow(2).sum() / w.pow(2).sum()).sqrt().item()
    assert abs(err - expected) < 1e-12
    assert 0.05 < err < 1.0


def test_randomized_svd_matches_exact_on_low_rank_plus_noise():
    torch.manual_seed(1)
    m = torch.randn(3, 60, 6, dtype=F64) @ torch.randn(3, 6, 40, dtype=F64) + 1e-3 * torch.randn(3, 60, 40, dtype=F64)
    u, s, v = dm.truncated_svd(m, 6, "exact")
    ur, sr, vr = dm.truncated_svd(m, 6, "randomized", generator=torch.Generator().manual_seed(0))
    assert ur.shape == (3, 60, 6) and vr.shape == (3, 40, 6)
    assert torch.allclose(s, sr, rtol=1e-6)
    e_exact = (m - u @ torch.diag_embed(s) @ v.mT).norm()
    e_rand = (m - ur @ torch.diag_embed(sr) @ vr.mT).norm()
    assert e_rand <= e_exact * (1 + 1e-6)
    up, sp, vp = dm.truncated_svd(m[:, :5, :4], 6)  # rank > min(a, b): zero padding
    assert up.shape == (3, 5, 6) and float(sp[:, 4:].abs().max()) == 0.0


def test_randomized_svd_in_float32_matches_float64_and_survives_rank_deficiency():
    """The randomized path (its small SVD from a float64 Gram) in float32 keeps the energy of the
    exact float64 SVD on a decaying spectrum, returns an orthonormal U, and stays a projection
    ``U diag(S) Vᵀ = U Uᵀ m`` when ``m`` has fewer directions than asked (zero matrix; rank 3
    for rank 8: the tail directions come back as zero)."""
    gen = torch.Generator().manual_seed(0)
    k = 96
    m = (torch.randn(2, 200, k, generator=gen, dtype=F64) * torch.arange(1, k + 1, dtype=F64) ** -1.0) \
        @ torch.randn(2, k, 300, generator=gen, dtype=F64)  # (2, 200, 300), σ_j ~ 1/j
    _, s_exact, _ = dm.truncated_svd(m, 20, "exact")
    u, s, v = dm.truncated_svd(m.float(), 20, "randomized", generator=torch.Generator().manual_seed(1))
    assert u.dtype == torch.float32
    assert float((s.double().pow(2).sum(-1) / s_exact.pow(2).sum(-1) - 1).abs().max()) < 1e-5
    assert float((u.double().mT @ u.double() - torch.eye(20, dtype=F64)).abs().max()) < 1e-5
    low = torch.randn(2, 120, 3, generator=gen) @ torch.randn(2, 3, 160, generator=gen)
    for bad in (low, torch.zeros(2, 120, 160)):
        u, s, v = dm.truncated_svd(bad, 8, "randomized", generator=torch.Generator().manual_seed(1))
        proj = u @ (u.mT @ bad)
        assert torch.allclose(u @ torch.diag_embed(s) @ v.mT, proj, atol=1e-4)
        assert torch.allclose(proj, bad, atol=1e-4)  # all of a rank-3 matrix is captured


def test_whiten_in_place_returns_the_cholesky_factor_of_the_summed_grams():
    """``whiten_in_place`` leaves ``L_i`` (``L_i L_iᵀ = Ĝ_i``) in the Gram stack and returns the
    lower Cholesky factor ``K`` of ``S = Σ Ĝ_i`` (factored in place of ``S``: the two never
    coexist) and ``λ``."""
    x, g = _grams(4, 16)
    damped, lam = dm.damped_grams(g.clone(), 0.01)
    store = g.clone()
    k, lam_got = fit.whiten_in_place(store, 0.01, 2, "cpu")
    assert torch.equal(k, k.tril()) and torch.allclose(k @ k.mT, damped.sum(0), rtol=1e-12, atol=1e-12)
    assert torch.allclose(store @ store.mT, damped, rtol=1e-12, atol=1e-12) and torch.equal(lam_got, lam)


@pytest.mark.parametrize("s", [2, 6])
def test_whitened_beats_plain_on_output_error(s):
    w = _experts(shared=0.5)
    c = fit.expert_core(w)
    x, g = _grams(4, 16)
    plain = dm.reconstruct_delta(c, *dm.delta_factors(w, c, s))
    white = dm.reconstruct_delta(c, *dm.whitened_delta_factors(w, c, s, g, damping=1e-4))
    out_plain, out_white = dm.relative_output_error(w, plain, g), dm.relative_output_error(w, white, g)
    assert out_white < 0.8 * out_plain  # strongly anisotropic inputs: a large gain
    # and plain is the weight-space optimum (Eckart–Young)
    assert dm.relative_weight_error(w, plain) <= dm.relative_weight_error(w, white)
    # output error helper == ‖(W − Ŵ) Xᵀ‖ / ‖W Xᵀ‖ computed directly
    direct = ((w - white) @ x.mT).norm() / (w @ x.mT).norm()
    assert abs(out_white - float(direct)) < 1e-10


def test_whitening_handles_never_routed_expert():
    _, g = _grams(4, 16)
    g[2] = 0  # an expert that no calibration token reached
    L = dm.whitening_factor(g)
    assert torch.isfinite(L).all()
    assert torch.allclose(L[2], L[2, 0, 0] * torch.eye(16, dtype=F64))  # ∝ I: weight-space SVD
    w = _experts()
    c = fit.expert_core(w)
    a, b = dm.whitened_delta_factors(w, c, 3, g)
    a0, b0 = dm.delta_factors(w, c, 3)
    assert torch.allclose(a[2] @ b[2].mT, a0[2] @ b0[2].mT, atol=1e-10)


@pytest.mark.parametrize("grams", [False, True])
@pytest.mark.parametrize("d_out,d_in", SHAPES)
def test_wrapper_refinement_never_increases_error_and_delta_is_not_worse(grams, d_out, d_in):
    w = _experts(d_out=d_out, d_in=d_in, shared=1.0)
    c = fit.expert_core(w)
    g = _grams(4, d_in)[1] if grams else None
    r = 3
    fac, hist = dm.wrapper_factors(w, c, r, g, steps=30)
    assert all(t.shape == (4, d, r) for t, d in zip(fac, (d_in, d_in, d_out, d_out)))
    assert len(hist) > 1 and min(hist) < hist[0]  # refinement helped
    final = dm.reconstruct_wrapper(c, *fac)
    lw = dm.whitening_factor(g) if grams else torch.eye(d_in, dtype=F64)
    assert abs(float(((w - final) @ lw).pow(2).sum()) - min(hist)) < 1e-8 * min(hist)  # best iterate kept
    start, _ = dm.wrapper_factors(w, c, r, g, steps=0)
    assert float(((w - final) @ lw).pow(2).sum()) <= float(((w - dm.reconstruct_wrapper(c, *start)) @ lw).pow(2).sum())
    if not grams:  # delta at s = 2r is never worse than wrapper at r (same params)
        delta = dm.reconstruct_delta(c, *dm.delta_factors(w, c, 2 * r))
        assert dm.relative_weight_error(w, delta) <= dm.relative_weight_error(w, final) + 1e-12


# ---------------------------------------------------------------------------- budget
def _shapes():
    return [budget.ProjectionShape((layer, p), 8, *((128, 64) if p == "down" else (64, 128)))
            for layer in range(2) for p in ("gate", "up", "down")]


def test_param_formulas():
    p = budget.ProjectionShape("x", 8, 48, 32)
    assert budget.projection_params("delta", p, 5) == 48 * 32 + 8 * 5 * (48 + 32)
    assert budget.projection_params("wrapper", p, 5) == 48 * 32 + 8 * 2 * 5 * (48 + 32)
    assert budget.projection_params("wrapper", p, 3) == budget.projection_params("delta", p, 6)
    assert p.original_params == 8 * 48 * 32 and p.max_rank == 32
    shapes = _shapes()
    ranks = {s.key: 4 for s in shapes}
    assert budget.active_macs_per_token("delta", shapes, ranks, 2) == 6 * (64 * 128 + 2 * 4 * 192)
    assert budget.active_macs_per_token("wrapper", shapes, ranks, 2) == 6 * 2 * (64 * 128 + 2 * 4 * 192)
    assert budget.original_macs_per_token(shapes, 2) == 6 * 2 * 64 * 128


@pytest.mark.parametrize("form", ["delta", "wrapper"])
@pytest.mark.parametrize("ratio", [0.2, 0.3, 0.5])
def test_uniform_solver_is_largest_feasible(form, ratio):
    shapes = _shapes()
    ranks = budget.solve_uniform(form, shapes, ratio)
    r = set(ranks.values()).pop()
    target = ratio * budget.original_params(shapes)
    assert budget.total_params(form, shapes, ranks) <= target
    assert budget.total_params(form, shapes, {k: r + 1 for k in ranks}) > target


@pytest.mark.parametrize("form", ["delta", "wrapper"])
def test_greedy_solver_respects_budget_and_follows_the_gains(form):
    shapes = _shapes()
    k = 64
    flat = [1e-3 / (j + 1) for j in range(k)]
    steep = [1.0 / (j + 1) for j in range(k)]  # layer 1 gate has far more energy to remove
    gains = {s.key: (steep if s.key == (1, "gate") else flat) for s in shapes}
    ranks = budget.solve_greedy(form, shapes, 0.25, gains)
    assert budget.total_params(form, shapes, ranks) <= 0.25 * budget.original_params(shapes)
    assert ranks[(1, "gate")] > ranks[(0, "gate")]
    # nothing more fits: every +1 would exceed the budget
    used = budget.total_params(form, shapes, ranks)
    assert all(used + budget.rank_unit_params(form, s) > 0.25 * budget.original_params(shapes)
               for s in shapes if ranks[s.key] < s.max_rank)


def test_budget_errors_name_the_problem():
    shapes = _shapes()
    with pytest.raises(ConfigError, match="unreachable"):
        budget.solve_uniform("delta", shapes, 0.02)
    with pytest.raises(ConfigError, match="unreachable"):
        budget.solve_greedy("wrapper", shapes, 0.02, {s.key: [1.0] for s in shapes})
    with pytest.raises(ConfigError, match=r"min\(d_in, d_out\) = 64 .*\(0, 'gate'\)"):
        budget.check_rank(shapes[0], 65)
    with pytest.raises(ConfigError):
        budget.check_rank(shapes[0], 0)


# ---------------------------------------------------------------------------- config
@pytest.mark.parametrize("kwargs,match", [
    ({"rank": 0}, "rank must be > 0"), ({"rank": -3}, "rank must be > 0"), ({"rank": 2.5}, "integer"),
    ({"target_ratio": 0.0}, r"\(0, 1\)"), ({"target_ratio": 1.5}, r"\(0, 1\)"), ({"target_ratio": 1.0}, r"\(0, 1\)"),
    ({"rank": 4, "target_ratio": 0.3}, "not both"), ({"form": "lora"}, "form must be one of"),
    ({"core": "median"}, "core"), ({"init": "random"}, "init"), ({"allocation": "x"}, "allocation"),
    ({"svd": "fast"}, "svd"), ({"refine_steps": -1}, "refine_steps"), ({"calib_seq_len": 0}, "calib_seq_len"),
    ({"whiten_damping": -0.1}, "whiten_damping"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        CompressionConfig(**kwargs)


def test_config_defaults_roundtrip_and_atomic_save(tmp_path):
    cfg = CompressionConfig()
    assert cfg.form == "ragged" and cfg.target_ratio == 0.25 and cfg.rank is None
    cfg = CompressionConfig(form="wrapper", rank=8, core="frequency", allocation="greedy")
    assert CompressionConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown.*bogus"):
        CompressionConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    path = cfg.save(tmp_path)
    assert path.name == CONFIG_FILENAME and [p.name for p in tmp_path.iterdir()] == [CONFIG_FILENAME]
    data = json.loads(path.read_text())
    assert "moecore_version" in data and data["rank"] == 8
    assert CompressionConfig.load(tmp_path) == cfg
    with pytest.raises(ConfigError, match="no moecore_config.json"):
        CompressionConfig.load(tmp_path / "missing")


@pytest.mark.parametrize("d", [300, 1030, 2048])
def test_triangular_products_equal_the_dense_ones_with_fewer_multiply_adds(d):
    """``maths.triangular``: products with a lower-triangular factor skip its zero half: equal to
    the dense products to float32 rounding (exactly the dense product below 2·MIN_BLOCK), and
    FlopCounterMode counts ``dense_fraction(d)`` of the dense FLOPs (0.625 at d = 2048)."""
    from torch.utils.flop_counter import FlopCounterMode

    from moecore.maths import triangular as tr

    g = torch.Generator().manual_seed(0)
    l = torch.randn(3, d, d, generator=g).tril()  # (n, d, d) lower
    a, b = torch.randn(3, 40, d, generator=g), torch.randn(3, d, 7, generator=g)
    for fn, args, ref in ((tr.lower_right, (a, l), a @ l), (tr.upper_right, (a, l), a @ l.mT),
                          (tr.lower_left, (l, b), l @ b)):
        with FlopCounterMode(display=False) as fc:
            got = fn(*args)
        dense = 2 * 3 * ref.shape[-2] * ref.shape[-1] * d
        if d < 2 * tr.MIN_BLOCK:
            assert torch.equal(got, ref) and fc.get_total_flops() == dense
        else:
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
        if d % 4 == 0:  # halves split evenly: the count is exact
            assert fc.get_total_flops() == dense * tr.dense_fraction(d), (fn.__name__, fc.get_total_flops(), dense)
    assert tr.dense_fraction(2048) == 0.625 and tr.dense_fraction(7168) == 0.5625 and tr.dense_fraction(768) == 1.0
