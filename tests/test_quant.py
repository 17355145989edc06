"""Quantized storage of the compressed experts (``moecore.quant``, ``CompressionConfig.quant``):
quantize/dequantize error bounds through the HQQ library, refit-after-quantization lowers the
whitened error, save -> ``from_pretrained`` gives bit-identical logits, statistics bytes equal
the bytes of the stored tensors, ``plan`` agrees, ``export_dense`` works, bad settings are
clear errors."""
from __future__ import annotations

import copy
import json
import re

import pytest
import torch

import moecore
from moecore.compressed_experts import CompressedExperts
from moecore.config import QuantConfig
from moecore.errors import ConfigError
from moecore.families import find_experts
from moecore.maths import decompose as dm
from moecore.quant import dequantize, packed_layout, quantize, quantize_layer
from tests._tiny_models import reload_bit_identical, stored_bytes, stored_expert_tensors, tiny_mixtral

# measured on Gaussian weights, group 64: about 0.005 / 0.087 / 0.18 / 0.43-0.46 (8/4/3/2 bits)
REL_BOUND = {8: 0.01, 4: 0.10, 3: 0.20, 2: 0.48}


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
@pytest.mark.parametrize("shape,kind", [((96, 256), "core"), ((4, 96, 13), "factor")])
def test_quantize_dequantize_error_bounds(bits, shape, kind):
    t = torch.randn(shape)
    for method in ("rtn", "hqq"):
        q = quantize(t, bits, 64, method, kind)
        codes_shape, codes_dtype, groups = packed_layout(t.numel(), bits, 64)
        assert q["qcodes"].shape == codes_shape and q["qcodes"].dtype == codes_dtype
        assert q["qscale"].shape == q["qzero"].shape == (groups, 1) and q["qscale"].dtype == torch.int16
        d = dequantize(q, shape, bits, kind)
        assert d.shape == t.shape
        assert float((d - t).norm() / t.norm()) < REL_BOUND[bits]
        if method == "rtn":  # round-to-nearest: every weight within half a step (+ float16 scale/zero rounding)
            view = t.mT if kind == "factor" else t
            flat = torch.nn.functional.pad(view.contiguous().reshape(-1), (0, groups * 64 - t.numel()))
            err = ((d.mT if kind == "factor" else d).contiguous().reshape(-1) - flat[: t.numel()]).abs()
            step = q["qscale"].view(torch.float16).float().expand(groups, 64).reshape(-1)[: t.numel()]
            assert bool((err <= 0.5 * step * 1.01 + 2e-3 * step * 2 ** bits).all())


def _fitted_layer(seed: int = 0):
    """A float delta-form layer of a tiny Mixtral fitted with whitening, its originals and Grams."""
    model, _ = tiny_mixtral(seed, hidden=128, layers=1, experts=4)
    path, module, layout = find_experts(model)[0]
    views = layout.split(module)
    weights = {p: views[p].detach().double() for p in ("gate", "up", "down")}
    torch.manual_seed(seed)
    x = torch.randn(4, 512, 128, dtype=torch.float64) * torch.linspace(0.2, 3, 128, dtype=torch.float64)  # (E, n, H)
    mid = torch.randn(4, 512, 256, dtype=torch.float64) * torch.linspace(0.2, 3, 256, dtype=torch.float64)
    grams = {"gate": x.mT @ x, "up": x.mT @ x, "down": mid.mT @ mid}
    cores, factors = {}, {}
    for p, w in weights.items():
        cores[p] = w.mean(0)
        factors[p] = dm.whitened_delta_factors(w, cores[p], 24, grams[p])
    fitted = CompressedExperts.from_factors(layout, "delta", cores, factors, dtype=torch.float32)
    return fitted, weights, grams


def _whitened_error(module, weights, grams) -> float:
    total = 0.0
    for p, w in weights.items():
        d = w - module.expert_weights(p).detach().double()  # (E, d_out, d_in)
        total += float(((d @ grams[p]) * d).sum())
    return total


@pytest.mark.parametrize("core_bits,factor_bits", [(4, None), (3, 8), (4, 4)])
def test_refit_after_quantization_lowers_the_whitened_error(core_bits, factor_bits):
    fitted, weights, grams = _fitted_layer()
    quant = QuantConfig(core_bits=core_bits, factor_bits=factor_bits, group_size=64)
    refit = quantize_layer(fitted, weights, grams, quant, refit=True)
    plain = quantize_layer(fitted, weights, grams, quant, refit=False)
    e_float, e_refit, e_plain = (_whitened_error(m, weights, grams) for m in (fitted, refit, plain))
    # quantized storage changes the weights, not the module: same class, same forward (torchao's model)
    assert type(refit) is CompressedExperts and type(refit).forward is type(fitted).forward
    assert sorted(refit.quantized)[0].startswith("core_") and not fitted.quantized
    assert all(n not in dict(refit.named_parameters()) for n in refit.quantized)  # stored as codes only
    assert e_refit < e_plain  # the factors absorb part of the rounding error
    assert e_float < e_refit  # quantization costs something
    for p in weights:
        assert refit.report[p]["quant_refit"] and refit.report[p]["output_rel_error"] > 0


def _whitening(gram: torch.Tensor):
    """The fit's whitening of raw Grams ``(E, d, d)``: ``L`` in place of a copy, ``K``, ``λ``."""
    from moecore.maths import fit as mf

    L = gram.to(torch.float64, copy=True)
    K, lam = mf.whiten_in_place(L, 0.01, L.shape[0], "cpu")
    return L, K, lam


def test_quantize_projection_a_chunk_of_experts_at_a_time_is_the_whole_layer_at_once():
    """The engine quantizes one projection at a time with the fit's whitening, ``chunk``
    experts at a time wherever a whole (E, d_out, d_in) tensor was built (refit, B re-solved for
    Q(A), errors): the codes are bit-identical to all experts at once, the refit is the exact
    whitened minimizer for the quantized core, and the reported errors are the direct float64
    ones on the raw Grams."""
    from moecore.quant import quantize_projection

    fitted, weights, grams = _fitted_layer()
    quant = QuantConfig(core_bits=3, factor_bits=4, group_size=64)
    form = fitted.form_impl
    for p, w in weights.items():
        L, K, lam = _whitening(grams[p])
        stored = {n: fitted.stored(n).detach() for n in (form.core_name(p), *form.factor_tensor_names(p))}
        whole = quantize_projection(form, p, w, stored, 24, quant, L=L, K=K, lam=lam)
        parts = quantize_projection(form, p, w, stored, 24, quant, L=L, K=K, lam=lam, chunk=1)
        assert whole[1].keys() == parts[1].keys() == {f"core_{p}", f"delta_a_{p}", f"delta_b_{p}"}
        for name, q in whole[1].items():
            assert all(torch.equal(q[k], parts[1][name][k]) for k in q), name
        assert whole[2]["quant_refit"] and abs(whole[2]["output_rel_error"] / parts[2]["output_rel_error"] - 1) < 1e-10
        total = float((w @ L).pow(2).sum())  # Σ‖W_i L_i‖², which the float fit knows: one product less
        known = quantize_projection(form, p, w, stored, 24, quant, L=L, K=K, lam=lam, chunk=1, whitened_total=total)
        assert known[2]["output_rel_error"] == pytest.approx(whole[2]["output_rel_error"], rel=1e-9)
        core, a, b = (whole[0][n] for n in (f"core_{p}", f"delta_a_{p}", f"delta_b_{p}"))
        approx = dm.reconstruct_delta(core, a, b)
        assert whole[2]["weight_rel_error"] == pytest.approx(dm.relative_weight_error(w, approx), rel=1e-10)
        assert whole[2]["output_rel_error"] == pytest.approx(dm.relative_output_error(w, approx, grams[p]), rel=1e-8)
        # the refit (before Q(A), Q(B)) minimizes the whitened error for Q(C): as the closed form does
        refit = form.refit_factors(w, core, 24, L, K)
        closed = dm.whitened_delta_factors(w, core, 24, grams[p])
        objective = [dm.relative_output_error(w, dm.reconstruct_delta(core, *f), grams[p] + 0.01 * torch.diagonal(
            grams[p], dim1=-2, dim2=-1).mean(-1)[:, None, None] * torch.eye(grams[p].shape[-1], dtype=torch.float64))
            for f in (refit, closed)]
        assert objective[0] == pytest.approx(objective[1], rel=1e-9)


def test_quantized_delta_with_float32_grams_compresses_and_refits():
    """Real shapes store their Gram stacks in float32 (above 1 GiB in float64).  The delta form's
    refit after quantization then runs on the fit's float32 whitening factors (it once mixed a
    float64 residual with float32 Grams and stopped at every real shape): the calibrated,
    refit, quantized layer matches the float64-Gram run to rounding."""
    from moecore.data import load_split

    texts = load_split("calib")[:4]
    errors = {}
    for grams in ("float32", "float64"):
        model, tok = tiny_mixtral(seed=3, layers=1)
        cfg = moecore.CompressionConfig(form="delta", rank=8, gram_dtype=grams, calib_max_tokens=1024, refine_steps=1,
                                        recover_steps=0, quant={"core_bits": 3, "factor_bits": 8, "group_size": 32})
        moecore.compress(model, cfg, calibration=texts, tokenizer=tok)
        report = find_experts(model, "compressed")[0][1].report
        assert all(r["quant_refit"] for r in report.values())
        errors[grams] = {p: report[p]["output_rel_error"] for p in report}
    for p, e in errors["float64"].items():
        assert 0 < e < 1 and errors["float32"][p] == pytest.approx(e, rel=1e-3)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model, tok = tiny_mixtral(1, hidden=64, layers=2, experts=4)
    cfg = moecore.CompressionConfig(form="delta", rank=16, quant={"core_bits": 4, "factor_bits": 3, "group_size": 32})
    moecore.compress(model, cfg)
    d = moecore.save_compressed(model, tmp_path_factory.mktemp("q") / "mix-q", tokenizer=tok)
    return model, d


def test_save_load_is_bit_identical(saved):
    from transformers import AutoModelForCausalLM

    model, d = saved
    ids = torch.arange(1, 33)[None]
    loaded = AutoModelForCausalLM.from_pretrained(d).eval()
    experts = [m for m in loaded.modules() if isinstance(m, CompressedExperts) and m.quantized]
    assert len(experts) == 2 and experts[0].quant == QuantConfig(4, 3, 32, "hqq")
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, loaded(ids).logits)
    qc = json.loads((d / "config.json").read_text())["quantization_config"]
    assert all(spec["quant"] == {"core_bits": 4, "factor_bits": 3, "group_size": 32, "method": "hqq"}
               for spec in qc["layers"].values())


def test_statistics_bytes_are_the_stored_tensor_bytes(saved):
    model, d = saved
    stats = moecore.statistics(model)
    stored = stored_bytes(stored_expert_tensors(d, model))  # the load guards are not expert storage
    assert stats["experts"]["bytes_compressed"] == stored
    layer = stats["layers"][0]
    assert layer["quant"]["factor_bits"] == 3
    assert sum(r["bytes_compressed"] for r in layer["projections"].values()) == layer["bytes_compressed"]
    # parameters count the weights the codes encode: E·s·(d_out + d_in) + d_out·d_in per projection
    assert layer["projections"]["gate"]["params_compressed"] == 4 * 16 * (128 + 64) + 128 * 64
    # plan from the config alone counts the same bytes
    planned = moecore.plan(model.config.to_dict(), moecore.CompressionConfig(
        form="delta", rank=16, quant={"core_bits": 4, "factor_bits": 3, "group_size": 32}), dtype=torch.float32)
    assert planned["experts"]["bytes_compressed"] == stored


def test_export_dense_matches_the_dequantized_model(saved, tmp_path):
    from transformers import AutoModelForCausalLM

    model, _ = saved
    out = moecore.export_dense(model, tmp_path / "dense")
    dense = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.arange(1, 33)[None]
    with torch.no_grad():
        assert float((dense(ids).logits - model(ids).logits).abs().max()) < 1e-4


@pytest.mark.parametrize("bad,msg", [
    ({"core_bits": 5}, "core_bits"), ({"factor_bits": 1}, "factor_bits"), ({"core_bits": None, "factor_bits": None}, "needs"),
    ({"group_size": 0}, "group_size"), ({"method": "gptq"}, "method"), ({"bits": 4}, "unknown"), (4, "QuantConfig"),
])
def test_bad_quant_setting_is_a_clear_error(bad, msg):
    with pytest.raises(ConfigError, match=msg):
        moecore.CompressionConfig(quant=bad)


@pytest.mark.parametrize("form,factor", [("wrapper", "wrap_u_in_gate"), ("ragged", "ragged_a_gate"),
                                         ("basis", "basis_b_gate")])
def test_the_other_forms_have_quantized_storage_too(tmp_path, form, factor):
    """Quantized storage is the form's business (issue 19): the wrapper form (four factors) and
    the ragged form (side-by-side factors plus integer per-expert ranks, which stay as they are)
    store core and factors quantized, round-trip bit-identically, count the bytes they store,
    and their weight error at 8 bits stays near the float fit's (their factors are not refit)."""
    model, tok = tiny_mixtral(seed=5)
    cfg = moecore.CompressionConfig(form=form, rank=8, quant={"core_bits": 8, "factor_bits": 8, "group_size": 32})
    model = moecore.compress(model, cfg)
    assert moecore.CompressionConfig.from_dict(cfg.to_dict()) == cfg
    d = moecore.save_compressed(model, tmp_path / f"{form}-q", tokenizer=tok)
    stored = stored_expert_tensors(d, model)
    assert any(k.endswith(f".{factor}_qcodes") for k in stored) and any(k.endswith(".core_down_qcodes") for k in stored)
    assert not any(t.is_floating_point() and t.dim() > 1 for t in stored.values())  # nothing left in float
    stats = moecore.statistics(reload_bit_identical(model, d))
    assert stats["experts"]["bytes_compressed"] == stored_bytes(stored)
    for r in stats["layers"][0]["projections"].values():
        assert r["quant_refit"] is False  # said, not pretended
        assert r["weight_rel_error"] < r["float_weight_rel_error"] + 0.01


def test_kd_trains_float_factors_against_the_quantized_core(saved):
    from moecore.quant import float_factors, quantize_factors
    from moecore.training.common import select_trainable

    model, _ = saved
    model = copy.deepcopy(model).eval()
    ids = torch.arange(1, 33)[None]
    with torch.no_grad():
        before = model(ids).logits
    assert float_factors(model) == 2
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)  # the float factors hold the dequantized values
    trainable = set(select_trainable(model))  # what `moecore distill` does: factors trainable, the rest frozen
    assert trainable and all(".delta_" in n for n in trainable)
    assert all(m.quant.factor_bits is None and m.quantized and all(k.startswith("core_") for k in m.quantized)
               for m in model.modules() if isinstance(m, CompressedExperts))
    loss = model(ids, labels=ids).loss
    loss.backward()  # gradients reach the factors through the dequantized (frozen) core
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n in trainable)
    model.zero_grad(set_to_none=True)
    assert quantize_factors(model, 3) == 2
    with torch.no_grad():
        again = model(ids).logits
    assert float((again - before).abs().max()) < 0.05 * float(before.abs().max())


def test_distill_on_quantized_factors_says_why_nothing_trains(saved):
    from moecore.training.common import select_trainable

    with pytest.raises(ConfigError, match=r"stores its factors quantized \(model\.layers\.0\.mlp\.experts and 1 "
                                          r"more layer\(s\)\), and moecore trains float factors only: .*--core-bits"):
        select_trainable(copy.deepcopy(saved[0]))


def test_cli_compress_and_plan_with_quantized_storage(tmp_path, capsys):
    from moecore.cli import main
    from tests._tiny_models import save_tiny

    src = save_tiny(tmp_path / "tiny", seed=2, hidden=64, layers=1, experts=4)
    out = tmp_path / "q"
    assert main(["compress", "--no-calib", str(src), "-o", str(out), "--rank", "8", "--core-bits", "4", "--factor-bits", "8",
                 "--quant-group", "32", "--quiet"]) == 0
    stats = moecore.stats.read_statistics_yaml(out / moecore.stats.STATS_FILENAME)
    assert stats["layers"][0]["quant"] == {"core_bits": 4, "factor_bits": 8, "group_size": 32, "method": "hqq"}
    capsys.readouterr()
    assert main(["plan", str(src), "--rank", "8", "--core-bits", "4", "--factor-bits", "8", "--quant-group", "32",
                 "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert next(iter(planned.values()))["experts"]["bytes_compressed"] == stats["experts"]["bytes_compressed"]
    assert main(["plan", str(src), "--rank", "8", "--core-bits", "5"]) == 2
    assert "core_bits must be one of" in capsys.readouterr().err


def test_checkpoint_missing_a_quantized_tensor_is_an_error(saved, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from moecore.errors import CheckpointError

    _, d = saved
    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    sd = load_file(bad / "model.safetensors")
    del sd[next(k for k in sd if k.endswith("core_gate_qscale"))]
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="core_gate_qscale"):
        AutoModelForCausalLM.from_pretrained(bad)


@pytest.mark.parametrize("field,value", [("group_size", 64), ("core_bits", 8), ("factor_bits", 4)])
def test_a_changed_group_size_or_bits_is_one_error_naming_the_tensor(saved, tmp_path, field, value):
    """Issue 20: the stored codes and scales no longer fit the entry: one error naming the
    tensor and the layer, not transformers' "look at the above report"."""
    import shutil

    from transformers import AutoModelForCausalLM

    from moecore.errors import CheckpointError

    _, d = saved
    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    cfg = json.loads((bad / "config.json").read_text())
    qc = cfg["quantization_config"]
    changed = 0
    for entry in [qc, *qc["layers"].values()]:
        if isinstance(entry.get("quant"), dict):
            entry["quant"][field] = value
            changed += 1
    assert changed
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: \S+_q\w+ has shape \(.*\), but the "
                                              r"quantization_config's entry for model\.layers\.\d\.mlp\.experts"):
        AutoModelForCausalLM.from_pretrained(bad)


@pytest.mark.parametrize("suffix,bad", [("core_up_qscale", "nan"), ("delta_a_gate_qzero", "inf"),
                                        ("delta_b_down_qcodes", "dtype")])
def test_tampered_quantized_tensors_are_refused_at_load_naming_them(saved, tmp_path, suffix, bad):
    """Issue 20: NaN / inf in stored scales or zero points, or codes of another dtype, are one
    CheckpointError at load naming the tensor (not "perplexity nan" with exit 0)."""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from moecore.errors import CheckpointError

    _, d = saved
    bad_dir = tmp_path / "bad"
    shutil.copytree(d, bad_dir)
    f = bad_dir / "model.safetensors"
    tensors = load_file(str(f))
    key = next(k for k in tensors if k.endswith(".experts." + suffix))
    t = tensors[key]
    if bad == "dtype":
        tensors[key] = t.to(torch.int16)
    else:
        value = torch.tensor(float(bad), dtype=torch.float16).view(torch.int16)
        tensors[key] = t.clone().flatten().index_fill_(0, torch.tensor([0]), value).view_as(t)
    save_file(tensors, str(f), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=re.escape(key.rsplit(".", 1)[0]) + r"\." + suffix):
        AutoModelForCausalLM.from_pretrained(bad_dir)


def test_a_non_finite_float_core_is_refused_at_load(tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from moecore.errors import CheckpointError

    model, tok = tiny_mixtral(seed=7)
    moecore.compress(model, moecore.CompressionConfig(rank=4, init="svd", refine_steps=0))
    d = moecore.save_compressed(model, tmp_path / "m", tokenizer=tok)
    tensors = load_file(str(d / "model.safetensors"))
    key = next(k for k in tensors if k.endswith(".experts.core_down"))
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=re.escape(key) + " holds NaN"):
        AutoModelForCausalLM.from_pretrained(d)
