"""The sync-free grouped-GEMM forward of ``CompressedExperts`` (issue 9) against a per-pair
reference: for every (token, expert) pair, the expert's dense weights reconstructed in
float64, its gated activation, weighted and summed per token.  Both forms, the fused and
the GPT-OSS (biased, interleaved, clamped) layouts, unequal ranks (padding), empty experts,
all tokens on one expert, T = 0 / 1, sentinel indices, float32 and bfloat16, gradients,
the operand cache, and ``torch.compile(fullgraph=True)``.  CUDA tests skip without a GPU."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from moecore import grouped
from moecore.compressed_experts import PROJECTIONS, CompressedExperts
from moecore.families import FUSED, GPT_OSS
from moecore.grouped import Routing, grouped_linear

E, H, F, K = 8, 64, 48, 2
RANKS = {"gate": 5, "up": 3, "down": 6}  # unequal: gate/up share a padded width, down its own
LAYOUTS = {"fused": dataclasses.replace(FUSED, hidden_act="silu"),
           "gpt_oss": dataclasses.replace(GPT_OSS, alpha=1.702, limit=7.0)}


def make(form: str, layout: str = "fused", h: int = H, f: int = F, seed: int = 0, dtype=torch.float32):
    """A CompressedExperts with random cores/factors/biases of realistic scale."""
    m = CompressedExperts(E, h, f, form, RANKS, LAYOUTS[layout], act_fn=torch.nn.SiLU(), dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            fan_in = p.shape[-1] if name.startswith("core_") else p.shape[-2]
            scale = 1.0 if name.startswith(("core_", "bias_")) else 0.5
            p.copy_(torch.randn(p.shape, generator=g) * scale / fan_in ** 0.5)
        for p in PROJECTIONS:  # the ragged form's per-expert ranks: uneven, expert 2 none
            for n in m.form_impl.index_param_names(p):
                pick = torch.randint(0, E, (E * RANKS[p],), generator=g)
                getattr(m, n).copy_(torch.bincount(torch.where(pick == 2, 0, pick), minlength=E))
    return m.eval()


def reference(m: CompressedExperts, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per-pair float64 maths: ``Σ_j w_tj · (W_d,e (act(W_g,e x + b_g, W_u,e x + b_u)) + b_d,e)``
    over each token's valid pairs (``0 <= e < E``); dense weights from the factors."""
    d = copy.deepcopy(m).double()
    wg, wu, wd = (d.expert_weights(p).detach() for p in PROJECTIONS)  # (E, d_out, d_in)
    act = d.layout.activation_fn(torch.nn.SiLU())
    x, w = x.double(), w.double()
    out = torch.zeros(x.shape[0], wd.shape[1], dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            if not 0 <= e < m.num_experts:
                continue
            g, u = wg[e] @ x[t], wu[e] @ x[t]  # (F,)
            if m.layout.has_bias:
                bg, bu = d.layout.split_bias(d.bias_gate_up.detach()[e])
                g, u = g + bg, u + bu
            y = wd[e] @ act(g, u)  # (H,)
            if m.layout.has_bias:
                y = y + d.bias_down.detach()[e]
            out[t] += w[t, j] * y
    return out


def routing(t: int, case: str, seed: int = 0):
    """``(T, k)`` indices and weights.  ``random``: distinct experts per token from the first
    E-1 (expert E-1 never gets a token); ``one``: every token's first pair on expert 3;
    ``sentinel``: also an ``E`` and (T > 1) a ``-1`` entry (no expert)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(E - 1, generator=g)[:K] for _ in range(t)]) if t else torch.zeros(0, K, dtype=torch.long)
    if case == "one":
        idx[:, 0] = 3
        idx[:, 1] = torch.where(idx[:, 1] == 3, 4, idx[:, 1])
    if case == "sentinel" and t:
        idx[0, 1] = E
        if t > 1:
            idx[-1, 0] = -1
    w = torch.softmax(torch.randn(t, K, generator=g), -1)  # fp32, as routers emit
    return idx, w


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("form", ["basis", "delta", "ragged", "wrapper"])
@pytest.mark.parametrize("layout", ["fused", "gpt_oss"])
def test_forward_matches_per_pair_reference(form, layout):
    m = make(form, layout)
    m16 = copy.deepcopy(m).to(torch.bfloat16)
    for t, case in [(0, "random"), (1, "random"), (1, "sentinel"), (7, "one"), (64, "random"), (64, "sentinel")]:
        idx, w = routing(t, case, seed=t)
        x = torch.randn(t, H, generator=torch.Generator().manual_seed(100 + t))
        with torch.no_grad():
            out = m(x, idx, w)
            out16 = m16(x.bfloat16(), idx, w)
        assert out.shape == (t, H) and out.dtype == torch.float32 and out16.dtype == torch.bfloat16
        if t == 0:
            continue
        ref = reference(m, x, idx, w)
        assert ref.abs().max() > 0.1  # the reference is not trivially zero
        assert rel_err(out, ref) < 2e-6, (t, case)
        # bf16: against the same maths on the bf16-rounded parameters and input
        assert rel_err(out16, reference(m16, x.bfloat16(), idx, w)) < 3e-2, (t, case)
        if case == "sentinel":  # a token whose pairs are all sentinels would be exactly 0
            keep = idx.clone()
            keep[(idx < 0) | (idx >= E)] = E  # any sentinel value means "no expert"
            with torch.no_grad():
                assert torch.equal(m(x, keep, w), out)


def test_empty_experts_and_all_tokens_on_one_expert_are_exact_in_float32():
    for form in ("basis", "delta", "ragged", "wrapper"):
        m = make(form)
        x = torch.randn(16, H)
        idx = torch.full((16, 1), 5)  # all 16 tokens on expert 5, the other 7 experts empty
        w = torch.ones(16, 1)
        with torch.no_grad():
            out = m(x, idx, w)
        dense = {p: m.expert_weights(p).detach()[5] for p in PROJECTIONS}
        h = torch.nn.functional.silu(x @ dense["gate"].mT) * (x @ dense["up"].mT)
        assert rel_err(out, (h @ dense["down"].mT).double()) < 2e-6


def test_unaligned_shapes_take_the_fallback_and_match():
    """H = 30, F = 22 (rows not 16-byte multiples in float32): transformers' per-group
    fallback op runs instead of the native kernel; same maths."""
    from torch.profiler import profile

    for form in ("delta", "wrapper"):
        m = make(form, h=30, f=22)
        idx, w = routing(9, "sentinel")
        x = torch.randn(9, 30)
        with torch.no_grad(), profile() as prof:
            out = m(x, idx, w)
        names = {e.name for e in prof.events()}
        assert "transformers::grouped_mm_fallback" in names and "aten::_grouped_mm" not in names
        assert rel_err(out, reference(m, x, idx, w)) < 2e-6
    m = make("delta")  # aligned, more rows than groups: the native grouped GEMM
    with torch.no_grad(), profile() as prof:
        m(torch.randn(32, H), *routing(32, "random"))
    assert "aten::_grouped_mm" in {e.name for e in prof.events()}
    with torch.no_grad(), profile() as prof:  # CPU decode (S < E): the op that skips empty experts
        m(torch.randn(2, H), *routing(2, "random"))
    names = {e.name for e in prof.events()}
    assert "transformers::grouped_mm_fallback" in names and "aten::_grouped_mm" not in names


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
def test_cpu_large_cores_used_as_stored(monkeypatch):
    """CPU, delta form: cores of at least ``CPU_LINEAR_CORE_BYTES`` are the stored tensors
    themselves (no copy), multiplied as ``(W xᵀ)ᵀ`` up to ``CPU_WXT_MAX_ROWS`` rows and
    ``x Wᵀ`` above; same maths, contiguous output, and the same under ``torch.compile``."""
    monkeypatch.setattr(grouped, "CPU_LINEAR_CORE_BYTES", 0)
    m = make("delta", "gpt_oss")
    for t, case in [(1, "random"), (7, "sentinel"), (grouped.CPU_WXT_MAX_ROWS, "random"),
                    (grouped.CPU_WXT_MAX_ROWS + 1, "sentinel"), (64, "one")]:
        idx, w = routing(t, case, seed=t)
        x = torch.randn(t, H, generator=torch.Generator().manual_seed(100 + t))
        with torch.no_grad():
            out = m(x, idx, w)
        assert out.is_contiguous() and rel_err(out, reference(m, x, idx, w)) < 2e-6, (t, case)
    ops = m.__dict__["_operand_cache"][1]
    assert "core_gu" not in ops and all(ops[f"core_{p}"].data_ptr() == getattr(m, f"core_{p}").data_ptr()
                                        for p in PROJECTIONS)
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True, backend="eager")
    for t in (1, 7, 64):
        idx, w = routing(t, "sentinel", seed=t)
        x = torch.randn(t, H)
        with torch.no_grad():
            assert torch.equal(compiled(x, idx, w), m(x, idx, w)), t


def test_grouped_linear_and_routing_offsets():
    idx = torch.tensor([[2, 0], [2, 7], [9, 2]])  # 9 = sentinel -> clamped to expert 7, weight 0
    r = Routing(idx, torch.ones(3, 2), num_experts=8, dtype=torch.float32)
    assert r.offs.dtype == torch.int32 and r.offs.tolist() == [1, 1, 4, 4, 4, 4, 4, 6]
    assert r.expert.tolist() == [0, 2, 2, 2, 7, 7] and r.token.tolist() == [0, 0, 1, 2, 1, 2]
    assert r.valid.squeeze(-1).tolist() == [True, True, True, True, True, False]
    assert r.weight.squeeze(-1).tolist() == [1, 1, 1, 1, 1, 0]
    assert r.offs2.tolist() == [1, 1, 4, 4, 4, 4, 4, 6] + [7, 7, 10, 10, 10, 10, 10, 12]
    x, wt = torch.randn(6, 16), torch.randn(8, 4, 16)  # (S, K), (G, N, K)
    ref = torch.stack([wt[e] @ xi for e, xi in zip(r.expert.tolist(), x)])
    assert torch.allclose(grouped_linear(x, wt, r.offs), ref, atol=1e-6)


@pytest.mark.parametrize("form", ["basis", "delta", "ragged", "wrapper"])
def test_gradients_reach_every_stored_tensor(form):
    """Training: operands are rebuilt per call (no cache) and differentiable; gradients of
    every parameter, the input and the routing weights equal those of the per-pair maths."""
    m = make(form, "gpt_oss").train()
    idx, w = routing(12, "sentinel")
    x = torch.randn(12, H)
    target = torch.randn(12, H)
    grads = []
    for fwd in ("module", "reference"):
        m.zero_grad()
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        out = m(xg, idx, wg) if fwd == "module" else _reference_f32(m, xg, idx, wg)
        ((out - target).pow(2).sum() + out.sum()).backward()  # out.sum(): a stride-0 gradient
        grads.append({**{n: p.grad.clone() for n, p in m.named_parameters()}, "x": xg.grad, "w": wg.grad})
    assert "_operand_cache" not in m.__dict__
    assert len(grads[0]) == 15 + 2 + 2 if form == "wrapper" else 9 + 2 + 2
    for n, g in grads[0].items():
        assert g.abs().max() > 1e-4, n  # every stored tensor gets a gradient
        assert torch.allclose(g, grads[1][n], atol=2e-4, rtol=1e-4), n
    assert grads[0]["w"][0, 1] == 0 and grads[0]["w"][-1, 0] == 0  # sentinel pairs


def _reference_f32(m, x, idx, w):
    """The per-pair maths, differentiable, in the module's dtype."""
    wg, wu, wd = (m.expert_weights(p) for p in PROJECTIONS)
    bg, bu = m.layout.split_bias(m.bias_gate_up)
    rows = []
    for t in range(x.shape[0]):
        acc = x.new_zeros(wd.shape[1])
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            if 0 <= e < m.num_experts:
                h = m._activation(wg[e] @ x[t] + bg[e], wu[e] @ x[t] + bu[e])
                acc = acc + w[t, j] * (wd[e] @ h + m.bias_down[e])
        rows.append(acc)
    return torch.stack(rows)


def test_operand_cache_follows_parameter_changes():
    m = make("delta")
    idx, w = routing(5, "random")
    x = torch.randn(5, H)
    with torch.no_grad():
        a = m(x, idx, w)
        first = m.__dict__["_operand_cache"][1]["gu_in"]
        assert torch.equal(m(x, idx, w), a) and m.__dict__["_operand_cache"][1]["gu_in"] is first  # reused
        m.delta_b_up.mul_(2)  # an in-place write (optimizer step, load_state_dict) bumps the version
        b = m(x, idx, w)
    assert rel_err(b, reference(m, x, idx, w)) < 2e-6 and not torch.allclose(a, b)
    m2 = make("delta", seed=1)
    m.load_state_dict(m2.state_dict())
    with torch.no_grad():
        assert torch.equal(m(x, idx, w), m2(x, idx, w))
    m.to(torch.bfloat16)  # .to() drops the cache
    assert "_operand_cache" not in m.__dict__
    with torch.inference_mode():  # parameters made in inference mode (no version counter) are cached too
        mi = make("wrapper")
        mi(x, idx, w)
        first = mi.__dict__["_operand_cache"][1]
        mi(x, idx, w)
        assert mi.__dict__["_operand_cache"][1] is first


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")  # in transformers' dispatcher
@pytest.mark.parametrize("form,layout,dtype", [("delta", "fused", torch.bfloat16), ("wrapper", "fused", torch.bfloat16),
                                               ("delta", "gpt_oss", torch.float32), ("wrapper", "gpt_oss", torch.bfloat16)])
def test_compile_fullgraph_no_graph_break(form, layout, dtype):
    """``fullgraph=True`` raises on any graph break (``.tolist()``, ``int(tensor)``, data-
    dependent shapes).  bfloat16 traces the native grouped GEMM; float32 under compile goes
    through transformers' opaque fallback op (transformers' own rule)."""
    torch._dynamo.reset()
    m = make(form, layout, dtype=dtype)
    compiled = torch.compile(m, fullgraph=True, backend="eager")
    for t in (1, 7, 64):
        idx, w = routing(t, "sentinel", seed=t)
        x = torch.randn(t, H, dtype=dtype)
        with torch.no_grad():
            got, want = compiled(x, idx, w), m(x, idx, w)
        assert torch.equal(got, want), t


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("form", ["delta", "wrapper"])
def test_cuda_bf16_no_host_sync_and_graph_capture(form):
    """On a GPU: bf16 forward equals the reference, runs with no host synchronization
    (``set_sync_debug_mode("error")``), and replays in a CUDA graph for T = 1..8."""
    m = make(form, "gpt_oss").to("cuda", torch.bfloat16)
    for t in range(1, 9):
        idx, w = routing(t, "sentinel", seed=t)
        x = torch.randn(t, H).bfloat16()
        ref = reference(m.cpu(), x, idx, w)
        m.cuda()
        args = (x.cuda(), idx.cuda(), w.cuda())
        with torch.no_grad():
            m(*args)  # builds the operand cache
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                out = m(*args)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static = m(*args)
            graph.replay()
            torch.cuda.synchronize()
        assert rel_err(out.cpu(), ref) < 3e-2 and torch.equal(static, out), t
