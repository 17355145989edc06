"""Plugins: a form is one file, and a family is one registration.

A toy form written to a temporary module, registered with
:func:`moecore.forms.register_form`, goes through compress -> save -> ``from_pretrained`` ->
statistics -> training selection -> quantized storage without any other file of moecore
knowing it (issue 19, point 1); an experts class with its own gated activation is taught
to moecore with :func:`moecore.register_layout` (point 4)."""
from __future__ import annotations

import importlib.util
import json
import sys
import textwrap

import pytest
import torch

import moecore
from moecore.errors import ConfigError
from moecore.families import find_experts
from moecore.forms import FORMS, PROJECTIONS, get_form, register_form, unregister_form
from moecore.training.common import select_trainable
from tests._tiny_models import reload_bit_identical, stored_bytes, stored_expert_tensors, tiny_mixtral

# W_i = C + L_i R_iᵀ, stored as toy_l / toy_r, fitted by (unwhitened) truncated SVD of W_i - mean,
# its forward a dense per-pair gather: nothing fast, only the contract.
TOY = textwrap.dedent('''
    import torch
    from moecore.forms.base import FitResult, Form
    from moecore.grouped import gate_up_bias
    from moecore.maths import decompose


    class ToyForm(Form):
        name = "toy"
        factor_names = ("toy_l", "toy_r")

        def factor_shapes(self, num_experts, d_out, d_in, rank):
            return (num_experts, d_out, rank), (num_experts, d_in, rank)

        def rank_unit_params(self, d_out, d_in):
            return d_out + d_in

        def core_runs_per_token(self, top_k):
            return top_k

        def fit(self, weights, core, rank, L, S, *, steps, method, generator, chunk, device, f64_factor_limit,
                expert_rank_cap=2.0):
            w = weights.to(device=device, dtype=torch.float64)
            core = w.mean(0)
            l, r = decompose.delta_factors(w, core, rank)
            return FitResult(core, (l, r), [0.0], refine_iters=0)

        def reconstruct(self, core, factors):
            l, r = factors
            return core + l @ r.mT

        def fused_operands(self, get, ranks):
            return {p: self.reconstruct(get(self.core_name(p)), tuple(get(n) for n in self.param_names(p)))
                    for p in ("gate", "up", "down")}

        def forward(self, x, route, ops, act, bias_gu=None, bias_down=None):
            xs = x[route.token]
            gate = torch.einsum("sh,sfh->sf", xs, ops["gate"][route.expert])
            up = torch.einsum("sh,sfh->sf", xs, ops["up"][route.expert])
            gate, up = gate_up_bias(gate, up, route, bias_gu)
            y = torch.einsum("sf,shf->sh", act(gate, up), ops["down"][route.expert])
            if bias_down is not None:
                y = y + bias_down[route.expert]
            return route.to_tokens(route.weight * y)


    FORM = ToyForm()
''')


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    path = tmp_path_factory.mktemp("plugin") / "toy_form_plugin.py"
    path.write_text(TOY, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("toy_form_plugin", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield register_form(module.FORM)
    unregister_form("toy")
    sys.modules.pop(spec.name, None)


def test_a_form_in_its_own_file_goes_through_compress_save_load_and_statistics(toy, tmp_path):
    model, tok = tiny_mixtral(seed=3)
    weights = [{k: v.clone() for k, v in layout.split(m).items()} for _, m, layout in find_experts(model)]
    model = moecore.compress(model, moecore.CompressionConfig(form="toy", rank=64, init="svd", refine_steps=0,
                                                               allow_larger=True))
    found = find_experts(model, "compressed")
    assert len(found) == 2 and all(m.form == "toy" and m.form_impl is toy for _, m, _ in found)
    # full rank (64 = min(d_out, d_in)): exact reconstruction
    for (_, m, _), w in zip(found, weights):
        for p in PROJECTIONS:
            assert torch.allclose(m.expert_weights(p).double(), w[p].double(), atol=1e-5)

    d = moecore.save_compressed(model, tmp_path / "toy", tokenizer=tok)
    qc = json.loads((d / "config.json").read_text())["quantization_config"]
    assert qc["form"] == "toy"
    stored = stored_expert_tensors(d, model)
    assert any(k.endswith(".toy_l_gate") for k in stored)
    loaded = reload_bit_identical(model, d)

    stats = moecore.statistics(loaded)
    assert stats["layers"][0]["form"] == "toy"
    assert stats["experts"]["params_compressed"] == sum(t.numel() for t in stored.values())
    assert stats["experts"]["bytes_compressed"] == stored_bytes(stored)
    # 4 experts at rank 64 of (128, 64) / (64, 128): C + 4·64·(128 + 64) per projection
    assert stats["layers"][0]["projections"]["gate"]["params_compressed"] == 128 * 64 + 4 * 64 * (128 + 64)
    # the core runs once per routed pair (core_runs_per_token = top_k = 2), the factors once per pair
    assert stats["layers"][0]["macs_compressed"] == 3 * (2 * 128 * 64 + 2 * 64 * (128 + 64))

    trainable = select_trainable(loaded)
    assert trainable and all(n.rsplit(".", 1)[-1].startswith(("toy_l_", "toy_r_")) for n in trainable)
    assert len(trainable) == 2 * 2 * 3  # 2 layers × 2 factors × 3 projections


def test_the_toy_form_has_quantized_storage_too(toy, tmp_path):
    model, tok = tiny_mixtral(seed=4)
    cfg = moecore.CompressionConfig(form="toy", rank=16, init="svd", refine_steps=0,
                                    quant={"core_bits": 4, "factor_bits": 4, "group_size": 32})
    model = moecore.compress(model, cfg)
    d = moecore.save_compressed(model, tmp_path / "toy-q", tokenizer=tok)
    stored = stored_expert_tensors(d, model)
    assert any(k.endswith(".toy_r_down_qcodes") for k in stored) and not any(k.endswith(".toy_r_down") for k in stored)
    stats = moecore.statistics(reload_bit_identical(model, d))
    assert stats["experts"]["bytes_compressed"] == stored_bytes(stored)
    assert stats["layers"][0]["projections"]["gate"]["params_compressed"] == 128 * 64 + 4 * 16 * (128 + 64)


def test_register_form_refuses_a_taken_name_or_factor_names(toy):
    assert register_form(toy) is toy  # idempotent
    clone = type(toy)()
    with pytest.raises(ConfigError, match="already registered"):
        register_form(clone)
    thief = type("Thief", (type(toy),), {"name": "thief", "factor_names": ("delta_a", "x")})()
    with pytest.raises(ConfigError, match="taken"):
        register_form(thief)
    assert "thief" not in FORMS and get_form("toy") is toy


def test_register_layout_teaches_moecore_a_new_experts_class():
    """A family whose gated activation transformers' markers can't describe: the error names
    ``moecore.register_layout``, and once the class is registered it compresses exactly at full rank."""
    from moecore.errors import UnsupportedModelError
    from moecore.families import KNOWN_LAYOUTS, ExpertsLayout, register_layout

    model, _ = tiny_mixtral(seed=6)
    base = type(model.model.layers[0].mlp.experts)

    class HalfClampExperts(base):  # clamp(act(gate), max=0.5) * clamp(up, ±0.5): the "act_fn_clamped" kind
        def _apply_gate(self, gate_up_out):
            gate, up = gate_up_out.chunk(2, dim=-1)
            return self.act_fn(gate).clamp(max=0.5) * up.clamp(-0.5, 0.5)

    for layer in model.model.layers:
        layer.mlp.experts.__class__ = HalfClampExperts
    ids = torch.arange(1, 33)[None]
    with torch.no_grad():
        before = model(ids).logits
    with pytest.raises(UnsupportedModelError, match=r"moecore\.register_layout\('HalfClampExperts'"):
        find_experts(model)
    try:
        register_layout(HalfClampExperts, ExpertsLayout(name="half_clamp", activation="act_fn_clamped", limit=0.5))
        with pytest.raises(ConfigError, match="already has a registered layout"):
            register_layout("HalfClampExperts", ExpertsLayout(name="other"))
        assert find_experts(model)[0].layout.name == "half_clamp"
        moecore.compress(model, moecore.CompressionConfig(rank=64, init="svd", refine_steps=0, allow_larger=True))
        with torch.no_grad():
            assert torch.allclose(model(ids).logits, before, atol=1e-4)
    finally:
        KNOWN_LAYOUTS.pop("HalfClampExperts", None)
