"""The basis form (``moecore/forms/basis.py``): experts in groups of 4 share a basis on the wide
side of each projection.  Its fit is exact at full (wide) rank in both orientations, with and
without whitening; the stored module at that rank runs the original experts; the whitened
objective it reports is the one it minimises and falls with the rank; a layer whose experts
are not a multiple of 4 is refused with a clear message."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import moecore
from moecore.compressed_experts import CompressedExperts
from moecore.errors import ConfigError
from moecore.families import FUSED as _FUSED
from moecore.forms import PROJECTIONS, get_form
from moecore.forms.basis import fit_basis

F64 = torch.float64
FUSED = dataclasses.replace(_FUSED, hidden_act="silu")
FORM = get_form("basis")


def _layer(e: int, d_out: int, d_in: int, seed: int = 0):
    """Random experts ``(E, d_out, d_in)`` and per-expert whitening ``L_i`` of anisotropic inputs."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(e, d_out, d_in, generator=g, dtype=F64)
    x = torch.randn(e, 4 * d_in, d_in, generator=g, dtype=F64) @ torch.randn(d_in, d_in, generator=g, dtype=F64)
    gram = x.mT @ x + 1e-3 * torch.eye(d_in, dtype=F64)  # (E, d_in, d_in)
    return w, torch.linalg.cholesky(gram), torch.linalg.cholesky(gram.sum(0))  # L_i and K (K Kᵀ = Σ Ĝ_i)


def _objective(w, core, factors, L):
    return float(((w - FORM.reconstruct(core, factors)) @ L).pow(2).sum())


@pytest.mark.parametrize("d_out,d_in", [(10, 16), (40, 16)], ids=["input-basis", "output-basis"])
@pytest.mark.parametrize("whiten", [True, False])
def test_full_rank_is_exact_and_the_objective_falls_with_rank(d_out, d_in, whiten):
    w, L, K = _layer(8, d_out, d_in)
    L, K = (L, K) if whiten else (None, None)
    core, factors, hist = fit_basis(w, w.mean(0), max(d_out, d_in), L, K, steps=2)
    assert factors[0].shape == (8, min(d_out, d_in), max(d_out, d_in)) == factors[1].shape[:1] + factors[0].shape[1:]
    assert torch.equal(factors[1][0], factors[1][3]) and not torch.equal(factors[1][3], factors[1][4])  # groups of 4
    assert float((FORM.reconstruct(core, factors) - w).norm() / w.norm()) < 1e-10
    prev = float("inf")
    for rank in (1, 3, 6):
        core, factors, hist = fit_basis(w, w.mean(0), rank, L, K, steps=6)
        got = _objective(w, core, factors, L if whiten else torch.eye(d_in, dtype=F64))
        assert got == pytest.approx(min(hist), rel=1e-9)  # the reported objective is the true one, best kept
        assert min(hist) <= hist[0] and got < prev
        prev = got


def test_module_at_full_rank_runs_the_original_experts():
    """Stored as a ``CompressedExperts`` (bases ``(E/4, wide, s)``), the grouped forward at the
    wide rank equals the dense original experts' per-pair maths."""
    e, h, f = 8, 12, 20
    g = torch.Generator().manual_seed(3)
    dense = {"gate": torch.randn(e, f, h, generator=g, dtype=F64), "up": torch.randn(e, f, h, generator=g, dtype=F64),
             "down": torch.randn(e, h, f, generator=g, dtype=F64)}
    cores, factors = {}, {}
    for p in PROJECTIONS:
        w = dense[p]
        cores[p], factors[p], _ = fit_basis(w, w.mean(0), max(w.shape[1:]), steps=1)
    m = CompressedExperts.from_factors(FUSED, "basis", cores, factors, dtype=F64)
    assert m.ranks == {"gate": f, "up": f, "down": f} and tuple(m.basis_b_gate.shape) == (2, f, f)
    x = torch.randn(16, h, generator=g, dtype=F64)
    idx = torch.randint(0, e, (16, 2), generator=g)
    wts = torch.rand(16, 2, generator=g, dtype=F64)
    with torch.no_grad():
        out = m(x, idx, wts)
    ref = torch.zeros_like(x)
    for j in range(2):
        k = idx[:, j]
        hid = torch.nn.functional.silu(torch.einsum("tfh,th->tf", dense["gate"][k], x)) * \
            torch.einsum("tfh,th->tf", dense["up"][k], x)
        ref += wts[:, j, None] * torch.einsum("thf,tf->th", dense["down"][k], hid)
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-10


def test_experts_not_a_multiple_of_four_are_refused():
    with pytest.raises(ConfigError, match="form 'basis' shares one basis among 4 experts.*got 6"):
        CompressedExperts(6, 12, 20, "basis", {"gate": 2, "up": 2, "down": 2}, FUSED, device="meta")
    from tests._tiny_models import tiny_mixtral

    model, _ = tiny_mixtral(experts=6)
    with pytest.raises(ConfigError, match="multiple of 4 experts"):
        moecore.compress(model, moecore.CompressionConfig(form="basis", target_ratio=0.5, init="svd"))


@pytest.mark.parametrize("d_out,d_in", [(10, 16), (40, 16)], ids=["input-basis", "output-basis"])
def test_the_best_iterate_is_returned_without_keeping_a_copy_of_it(monkeypatch, d_out, d_in):
    """As ``fit_delta``: only the best core is kept between steps; where the last step did worse
    (here an injected fault: step 1's eigendecompositions return the weakest directions), the
    best core's factors are computed again, bit for bit those of the pass that found them."""
    w, L, K = _layer(8, d_out, d_in)
    first = fit_basis(w, w.mean(0), 3, L, K, steps=0)
    calls, real = [], torch.linalg.eigh

    def faulty(x):
        calls.append(1)
        vals, vec = real(x)
        return (vals, vec.flip(-1)) if len(calls) in (3, 4) else (vals, vec)  # 2 groups of 4 experts
    monkeypatch.setattr(torch.linalg, "eigh", faulty)
    core, factors, hist = fit_basis(w, w.mean(0), 3, L, K, steps=1, tol=0.0)
    assert len(calls) == 6  # first pass, the faulty step, the best core's factors again
    assert len(hist) == 2 and hist[1] > hist[0] == first[2][0]
    assert torch.equal(core, first[0]) and all(torch.equal(x, y) for x, y in zip(factors, first[1]))
