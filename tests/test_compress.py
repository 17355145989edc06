"""compress() on tiny random models of every supported family (built from configs, no
download): exactness at full rank, error bounds at low rank, budgets, clear errors."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM, AutoTokenizer, DeepseekV3Config, GptOssConfig, LlamaConfig, MixtralConfig, OlmoeConfig,
    Qwen2MoeConfig, Qwen3MoeConfig,
)

from moecore.api import compress
from moecore.compressed_experts import CompressedExperts
from moecore.config import CompressionConfig
from moecore.errors import ConfigError, UnsupportedModelError
from moecore.families import find_experts
from moecore.maths import budget
from moecore.maths import decompose as dm

H, F, V = 32, 48, 4096  # hidden, expert intermediate, vocab of the bundled tokenizer
COMMON = dict(vocab_size=V, hidden_size=H, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128)
FAMILIES = {
    "mixtral": lambda: MixtralConfig(**COMMON, intermediate_size=F, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": lambda: Qwen2MoeConfig(**COMMON, intermediate_size=64, moe_intermediate_size=F, num_experts=4,
                                        shared_expert_intermediate_size=40, num_experts_per_tok=2, decoder_sparse_step=1),
    "qwen3_moe": lambda: Qwen3MoeConfig(**COMMON, intermediate_size=64, moe_intermediate_size=F, num_experts=4,
                                        num_experts_per_tok=2, decoder_sparse_step=1, head_dim=8),
    "olmoe": lambda: OlmoeConfig(**COMMON, intermediate_size=F, num_experts=4, num_experts_per_tok=2),
    "deepseek_v3": lambda: DeepseekV3Config(**{**COMMON, "num_key_value_heads": 4}, intermediate_size=64,
                                            moe_intermediate_size=F, n_routed_experts=8, num_experts_per_tok=2,
                                            n_group=2, topk_group=1, first_k_dense_replace=1, n_shared_experts=1,
                                            kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                            v_head_dim=8),
    "gpt_oss": lambda: GptOssConfig(**COMMON, intermediate_size=F, num_local_experts=4, num_experts_per_tok=2,
                                    head_dim=8, sliding_window=16),
}
TEXT = (
    "In the beginning God created the heaven and the earth. And the earth was without form, and void; "
    "and darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters. "
    "And God said, Let there be light: and there was light. And God saw the light, that it was good: "
    "and God divided the light from the darkness. And God called the light Day, and the darkness he called Night. "
)


def build(family: str, seed: int = 0, layers: int | None = None) -> nn.Module:
    """Tiny random model whose experts matter: expert weights re-drawn with std 1/sqrt(d_in)
    (the default 0.02 init would make the experts nearly invisible in the logits);
    ``layers`` decoder layers (default 2)."""
    torch.manual_seed(seed)
    cfg = FAMILIES[family]()
    if layers is not None:
        cfg.num_hidden_layers = layers
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for _, module, layout in find_experts(model):
            for name, p in module.named_parameters():
                fan_in = H if ("gate_up" in name) != layout.transposed else p.shape[-1 if not layout.transposed else -2]
                p.normal_(0, 0.1 if "bias" in name else 1.0 / math.sqrt(fan_in))
    return model


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(Path(__file__).resolve().parents[1] / "data" / "tokenizer")


def ids(n=2, t=24, seed=1):
    return torch.randint(0, V, (n, t), generator=torch.Generator().manual_seed(seed))


def compressed_modules(model):
    return [(n, m) for n, m, _ in find_experts(model, "compressed", required=False)]


def expert_params(model):
    """numel of the stored compressed expert weights (biases excluded), counted from tensors."""
    return sum(p.numel() for _, m in compressed_modules(model) for n, p in m.named_parameters() if not n.startswith("bias"))


# ---------------------------------------------------------------------------- family × form
@pytest.mark.parametrize("form", ["delta", "ragged", "wrapper"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_full_rank_is_exact_and_low_rank_is_not(family, form):
    model = build(family)
    x = ids()
    with torch.no_grad():
        ref = model(x, output_router_logits=True)
    originals = {n: {k: v.detach().clone() for k, v in m.named_parameters()} for n, m, _ in find_experts(model)}
    full = compress(copy.deepcopy(model), CompressionConfig(form=form, rank=min(H, F), refine_steps=3, allow_larger=True))
    out = full(x, output_router_logits=True)
    assert (out.logits - ref.logits).abs().max().item() < 1e-4
    # routing and router-logit recording untouched; aux loss identical
    assert len(out.router_logits) == len(ref.router_logits) == len(originals)
    for a, b in zip(out.router_logits, ref.router_logits):
        assert (a - b).abs().max().item() < 1e-5  # layer 1 routers see float-level differences
    if ref.aux_loss is not None:
        assert abs(out.aux_loss.item() - ref.aux_loss.item()) < 1e-5
    # materialize() gives back the family's own tensors
    mods = dict(compressed_modules(full))
    assert sorted(mods) == sorted(originals)
    for path, m in mods.items():
        assert m.form == form and m.layout.name == ("gpt_oss" if family == "gpt_oss" else "fused")
        dense = m.materialize()
        assert set(dense) == set(originals[path])
        for k, v in dense.items():
            assert v.shape == originals[path][k].shape
            assert (v - originals[path][k]).abs().max().item() < 1e-4  # float32 factors
            # float32 factors: the wrapper's three chained products round more than C + A Bᵀ
            assert dm.relative_weight_error(originals[path][k], v) < (1e-5 if form == "delta" else 5e-5)
        assert all(e["weight_rel_error"] < 1e-5 for e in m.report.values())
    # the test can fail: a low rank visibly changes the logits
    low = compress(copy.deepcopy(model), CompressionConfig(form=form, rank=2, refine_steps=3))
    assert (low(x).logits - ref.logits).abs().max().item() > 1e-3


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_compressed_experts_module_matches_original_forward(family):
    model = build(family)
    path, orig, layout = find_experts(model)[0]
    new = compress(copy.deepcopy(model), CompressionConfig(rank=min(H, F), allow_larger=True)).get_submodule(path)
    torch.manual_seed(3)
    hs = torch.randn(10, H)
    idx = torch.stack([torch.randperm(orig.num_experts)[:2] for _ in range(10)])
    w = torch.softmax(torch.randn(10, 2), -1)  # fp32 weights, as routers emit
    assert torch.allclose(new(hs, idx, w), orig(hs, idx, w), atol=1e-5)
    # bf16: dtype preserved end to end
    new16 = new.to(torch.bfloat16)
    assert new16(hs.bfloat16(), idx, w).dtype == torch.bfloat16


def test_delta_low_rank_error_is_the_discarded_singular_energy():
    model = build("qwen3_moe")
    weights = {n: {p: v.detach().double() for p, v in layout.split(m).items()} for n, m, layout in find_experts(model)}
    s = 5
    refined = compress(copy.deepcopy(model), CompressionConfig(form="delta", rank=s, init="svd"))  # refine_steps=10
    compress(model, CompressionConfig(form="delta", rank=s, init="svd", refine_steps=0))
    refined = dict(compressed_modules(refined))
    for path, m in compressed_modules(model):
        for p, w in weights[path].items():
            sv = dm.residual_spectrum(w, w.mean(0))  # (E, k)
            expected = math.sqrt(float(sv[:, s:].pow(2).sum() / w.pow(2).sum()))
            assert abs(m.report[p]["weight_rel_error"] - expected) < 1e-9
            measured = dm.relative_weight_error(w, m.expert_weights(p).double())  # from stored fp32 tensors
            assert abs(measured - expected) < 1e-5
            assert 0.2 < expected < 1.0
            # joint core/factor refinement starts from this closed form and can only lower the error
            r = refined[path].report[p]
            assert r["refine_iters"] >= 1 and r["weight_rel_error"] < expected - 1e-4
            assert abs(r["refine_objective_start"] - expected ** 2 * float(w.pow(2).sum())) < 1e-6 * float(w.pow(2).sum())


@pytest.mark.parametrize("form", ["delta", "wrapper"])
def test_whitened_beats_plain_on_calibration_output_error(tok, form):
    model = build("mixtral")
    texts = [TEXT] * 4
    plain = compress(copy.deepcopy(model), CompressionConfig(form=form, rank=4, init="svd", refine_steps=10), texts, tok)
    white = compress(copy.deepcopy(model), CompressionConfig(form=form, rank=4, init="whitened", refine_steps=10), texts, tok)
    for (_, mp), (_, mw) in zip(compressed_modules(plain), compressed_modules(white)):
        for p in ("gate", "up", "down"):
            assert mw.report[p]["whitened"] and not mp.report[p]["whitened"]
            assert mw.report[p]["output_rel_error"] < mp.report[p]["output_rel_error"]
            if form == "delta":  # plain is the weight-space optimum
                assert mp.report[p]["weight_rel_error"] <= mw.report[p]["weight_rel_error"] + 1e-9


@pytest.mark.parametrize("weighting", ["tokens", "routing"])
def test_calibration_grams_match_the_routed_inputs(tok, weighting):
    """The Gram of expert e is Σ_t c_t x_t x_tᵀ over the tokens routed to e, with c_t = 1
    ("tokens") or the squared routing weight ("routing"); counts are routed tokens; the
    shrinkage adds κ·Ḡ (Ḡ = Σ_e G_e / Σ_e n_e) to every expert."""
    from moecore.calibration import ExpertsInputHook

    model = build("qwen3_moe")
    path, module, layout = find_experts(model)[0]
    seen, hook = [], ExpertsInputHook()
    h1 = module.register_forward_pre_hook(
        lambda m, a: seen.append((a[0].detach().reshape(-1, H).double(), a[1], a[2].detach().double())))
    h2 = module.register_forward_pre_hook(hook, with_kwargs=True)
    model(input_ids=ids(3, 16))
    h1.remove(), h2.remove()
    inputs = hook.inputs(module.num_experts, weighting)
    x, idx, w = (torch.cat(t) for t in zip(*seen))
    e_n = module.num_experts
    grams = inputs.grams("in", torch.empty(e_n, H, H, dtype=torch.float64), "cpu")
    assert int(inputs.counts.sum()) == idx.numel()
    expected = []
    for e in range(e_n):
        hit = idx == e
        c = (w * hit).sum(-1) ** 2 if weighting == "routing" else hit.any(-1).double()  # (T,)
        expected.append((x * c[:, None]).mT @ x)
        assert torch.allclose(grams[e], expected[e], atol=1e-9, rtol=1e-9)
        assert int(inputs.counts[e]) == int(hit.any(-1).sum())
    shrunk = inputs.grams("in", torch.empty(e_n, H, H, dtype=torch.float32), "cpu", prior_tokens=5.0)
    prior = 5.0 * sum(expected) / idx.numel()
    for e in range(e_n):
        assert torch.allclose(shrunk[e].double(), expected[e] + prior, rtol=1e-5, atol=1e-5)


def test_calibration_frequency_core_and_greedy_allocation(tok):
    model = build("olmoe")
    cfg = CompressionConfig(form="delta", target_ratio=0.5, core="frequency", allocation="greedy")
    shapes = [s for n, m, _ in find_experts(model) for s in CompressedExperts(
        m.num_experts, H, F, "delta", {"gate": 1, "up": 1, "down": 1}, find_experts(model)[0][2]).projection_shapes(n)]
    orig = budget.original_params(shapes)
    compress(model, cfg, [TEXT] * 3, tok)
    assert model.moecore_config is cfg
    assert expert_params(model) <= 0.5 * orig
    ranks = [r for _, m in compressed_modules(model) for r in m.ranks.values()]
    assert min(ranks) >= 1 and all(m.report[p]["output_rel_error"] is not None for _, m in compressed_modules(model)
                                   for p in ("gate", "up", "down"))
    assert torch.isfinite(model(ids()).logits).all()


# ---------------------------------------------------------------------------- budgets
@pytest.mark.parametrize("form", ["basis", "delta", "ragged", "wrapper"])
def test_param_count_equals_budget_formula_and_ratio_is_met(form):
    model = build("deepseek_v3")
    original = sum(m.gate_up_proj.numel() + m.down_proj.numel() for _, m, _ in find_experts(model))
    compress(model, CompressionConfig(form=form, target_ratio=0.5, refine_steps=2))
    total = 0
    for path, m in compressed_modules(model):
        formula = sum(budget.projection_params(form, s, m.ranks[s.key[1]]) for s in m.projection_shapes(path))
        stored = sum(p.numel() for p in m.parameters())
        assert stored == formula
        total += stored
    assert total <= 0.5 * original
    r = next(iter(compressed_modules(model)))[1].ranks["gate"]
    assert total + 3 * budget.rank_unit_params(form, budget.ProjectionShape("x", 8, F, H)) > 0.5 * original
    # active multiply-adds: delta runs the core once per token, wrapper k times
    m = compressed_modules(model)[0][1]
    core = 3 * H * F
    low = r * (2 * (H + F) + (H + F))
    expected = core + 2 * low if form in ("basis", "delta", "ragged") else 2 * (core + 2 * low)
    assert m.active_macs_per_token(2) == expected


def test_meta_construction_matches_compressed_state_dict():
    model = compress(build("gpt_oss"), CompressionConfig(form="wrapper", rank=3, refine_steps=1))
    path, m = compressed_modules(model)[0]
    with torch.device("meta"):
        empty = CompressedExperts(m.num_experts, H, F, "wrapper", m.ranks, m.layout)
    a, b = m.state_dict(), empty.state_dict()
    assert list(a) == list(b) and all(a[k].shape == b[k].shape for k in a)
    assert not any(("gate_up_proj" in k or "down_proj" in k or k.split(".")[0].isdigit()) for k in model.state_dict()
                   if k.startswith(path))
    assert {"core_gate", "wrap_u_in_down", "bias_gate_up", "bias_down"} <= set(a)


# ---------------------------------------------------------------------------- errors
def test_non_moe_model_is_rejected():
    llama = AutoModelForCausalLM.from_config(LlamaConfig(**COMMON, intermediate_size=64))
    with pytest.raises(UnsupportedModelError, match="not a Mixture-of-Experts model"):
        compress(llama, CompressionConfig(rank=4))


def test_modulelist_experts_are_rejected_naming_the_module():
    from transformers.models.llama.modeling_llama import LlamaMLP

    cfg = LlamaConfig(**COMMON, intermediate_size=64)
    llama = AutoModelForCausalLM.from_config(cfg)
    llama.model.layers[1].mlp.experts = nn.ModuleList([LlamaMLP(cfg) for _ in range(4)])
    with pytest.raises(UnsupportedModelError, match=r"model\.layers\.1\.mlp\.experts .*list of separate modules"):
        compress(llama, CompressionConfig(rank=4))
    model = build("mixtral")
    bad = model.model.layers[0].mlp.experts
    bad.down_proj = nn.Parameter(torch.zeros(4, H, F + 1))
    with pytest.raises(UnsupportedModelError, match=r"model\.layers\.0\.mlp\.experts .*unexpected expert shapes"):
        compress(model, CompressionConfig(rank=4))


def test_bad_budgets_and_calibration_raise_config_errors(tok):
    model = build("qwen2_moe")
    with pytest.raises(ConfigError, match=r"rank 33 is larger than min\(d_in, d_out\) = 32 .*mlp\.experts"):
        compress(model, CompressionConfig(rank=33))
    with pytest.raises(ConfigError, match="unreachable"):
        compress(model, CompressionConfig(target_ratio=0.05))
    with pytest.raises(ConfigError, match="needs calibration"):
        compress(model, CompressionConfig(rank=4, init="whitened"))
    with pytest.raises(ConfigError, match="needs calibration"):
        compress(model, CompressionConfig(rank=4, core="frequency"))
    with pytest.raises(ConfigError, match="empty"):
        compress(model, CompressionConfig(rank=4), calibration=[], tokenizer=tok)
    with pytest.raises(ConfigError, match="empty"):
        compress(model, CompressionConfig(rank=4), calibration=["   "], tokenizer=tok)
    with pytest.raises(ConfigError, match="tokenizer"):
        compress(model, CompressionConfig(rank=4), calibration=[TEXT])
    for bad in ({"rank": 0}, {"target_ratio": 0}, {"target_ratio": 1.5}):
        with pytest.raises(ConfigError):
            CompressionConfig(**bad)
    assert not compressed_modules(model)  # failed calls left the model untouched


def test_randomized_svd_is_close_to_exact_and_seeded():
    model = build("mixtral")
    # closed form only (refine_steps=0): Eckart-Young makes the exact SVD the lower bound
    exact = compress(copy.deepcopy(model), CompressionConfig(form="delta", rank=6, svd="exact", refine_steps=0))
    rand = [compress(copy.deepcopy(model), CompressionConfig(form="delta", rank=6, svd="randomized", seed=5, refine_steps=0))
            for _ in range(2)]
    for (_, me), (_, mr), (_, mr2) in zip(*(compressed_modules(m) for m in (exact, *rand))):
        for p in ("gate", "up", "down"):
            e, r = me.report[p]["weight_rel_error"], mr.report[p]["weight_rel_error"]
            assert e <= r + 1e-9 and r < 1.01 * e
            assert torch.equal(getattr(mr, f"delta_a_{p}"), getattr(mr2, f"delta_a_{p}"))  # same seed, same result


@pytest.mark.parametrize("form", ["basis", "delta", "ragged", "wrapper"])
@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_gradients_match_a_dense_reference(family, form):
    """The factored forward is differentiable and gives the same gradients as running the
    reconstructed dense experts (what distillation relies on)."""
    model = build(family)
    _, m = compressed_modules(compress(model, CompressionConfig(form=form, rank=3, refine_steps=2)))[0]
    torch.manual_seed(4)
    hs = torch.randn(12, H)
    idx = torch.stack([torch.randperm(m.num_experts)[:2] for _ in range(12)])
    w = torch.softmax(torch.randn(12, 2), -1)
    target = torch.randn(12, H)

    def dense_forward():
        wg, wu, wd = (m.expert_weights(p) for p in ("gate", "up", "down"))  # (E, d_out, d_in)
        out = torch.zeros_like(hs)
        for j in range(2):
            e = idx[:, j]
            gate = torch.einsum("tfh,th->tf", wg[e], hs)
            up = torch.einsum("tfh,th->tf", wu[e], hs)
            if m.layout.has_bias:
                bg, bu = m.layout.split_bias(m.bias_gate_up)
                gate, up = gate + bg[e], up + bu[e]
            y = torch.einsum("thf,tf->th", wd[e], m._activation(gate, up))
            if m.layout.has_bias:
                y = y + m.bias_down[e]
            out = out + w[:, j, None] * y
        return out

    grads = []
    for fwd in (lambda: m(hs, idx, w), dense_forward):
        m.zero_grad()
        (fwd() - target).pow(2).sum().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    assert set(grads[0]) == set(grads[1]) and len(grads[0]) >= 6
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-4, rtol=1e-4), n
    assert any(g.abs().max() > 1e-3 for g in grads[0].values())
