"""Save -> ``from_pretrained`` round trips through the registered quantizer, dense export to
stock transformers, dtypes, atomic writes and checkpoint faults.  Tiny random configs of
every family, no downloads."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModel, AutoModelForCausalLM, DeepseekV3Config, GptOssConfig, MixtralConfig, OlmoeConfig, Qwen2MoeConfig,
    Qwen3MoeConfig,
)

import moecore
from moecore.compressed_experts import CompressedExperts
from moecore.errors import CheckpointError, UnsupportedModelError
from moecore.families import find_experts
from moecore.checkpoint_format import LOAD_NOTICE_KEY, load_guards
from moecore.export import INDEX, export_checkpoint
from moecore.hf_integration import MoecoreHfQuantizer, MoecoreQuantizationConfig
from moecore.modeling import load_model
from moecore.stats import STATS_FILENAME, read_statistics_yaml

V, H, F = 96, 32, 24
COMMON = dict(vocab_size=V, hidden_size=H, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64)
FAMILIES = {
    "mixtral": lambda: MixtralConfig(**COMMON, intermediate_size=F, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": lambda: Qwen2MoeConfig(**COMMON, intermediate_size=40, moe_intermediate_size=F, num_experts=4,
                                        num_experts_per_tok=2, shared_expert_intermediate_size=40),
    "qwen3_moe": lambda: Qwen3MoeConfig(**COMMON, intermediate_size=40, moe_intermediate_size=F, num_experts=4,
                                        num_experts_per_tok=2, head_dim=8),
    "olmoe": lambda: OlmoeConfig(**COMMON, intermediate_size=F, num_experts=4, num_experts_per_tok=2,
                                 eos_token_id=1, pad_token_id=0, bos_token_id=None),
    "deepseek_v3": lambda: DeepseekV3Config(**{**COMMON, "num_hidden_layers": 3, "num_key_value_heads": 4},
                                            intermediate_size=40, moe_intermediate_size=F, n_routed_experts=8,
                                            num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
                                            n_shared_experts=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
                                            qk_nope_head_dim=8, v_head_dim=8, rope_scaling=None),
    "gpt_oss": lambda: GptOssConfig(**COMMON, intermediate_size=F, num_local_experts=4, num_experts_per_tok=2,
                                    head_dim=8, sliding_window=16),
}
FORMS = ("basis", "delta", "ragged", "wrapper")
CASES = [(f, form) for f in FAMILIES for form in FORMS]


def build(family: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A tiny random model of ``family`` (eval mode)."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(FAMILIES[family](), dtype=dtype).eval()


def ccfg(form: str, **kw) -> moecore.CompressionConfig:
    return moecore.CompressionConfig(form=form, refine_steps=2, **({"rank": 4} | kw))


def input_ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(input_ids()).logits


def stored(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Every (family, form): the compressed model, its logits and its saved directory."""
    root = tmp_path_factory.mktemp("saved")
    out = {}
    for family, form in CASES:
        model = moecore.compress(build(family), ccfg(form))
        d = moecore.save_compressed(model, root / f"{family}-{form}")
        out[(family, form)] = (model, logits(model), d)
    return out


@pytest.mark.parametrize("family,form", CASES)
def test_save_load_is_bit_identical(saved, family, form):
    model, ref, d = saved[(family, form)]
    loaded = AutoModelForCausalLM.from_pretrained(d)
    assert isinstance(loaded.hf_quantizer, MoecoreHfQuantizer)
    comp = {n: m for n, m, _ in find_experts(loaded, "compressed")}
    assert all(isinstance(m, CompressedExperts) for m in comp.values())
    assert len(comp) == 2  # deepseek_v3: 3 layers, the first dense
    assert all(m.form == form and m.ranks == {"gate": 4, "up": 4, "down": 4} for m in comp.values())
    assert torch.equal(logits(loaded), ref)
    assert moecore.statistics(loaded) == moecore.statistics(model)  # incl. reconstruction errors
    if family == "mixtral":  # the base model (no LM head) loads from the same checkpoint
        base = AutoModel.from_pretrained(d)
        with torch.no_grad():
            assert torch.equal(base(input_ids()).last_hidden_state, model.model(input_ids()).last_hidden_state)
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys()
    for k in sd:
        assert sd[k].dtype == sd2[k].dtype and torch.equal(sd[k], sd2[k]), k


@pytest.mark.parametrize("family,form", CASES)
def test_checkpoint_contents(saved, family, form):
    model, _, d = saved[(family, form)]
    qc = json.loads((d / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "moecore" and qc["form"] == form and qc["moecore_version"] == moecore.__version__
    paths = [n for n, _, _ in find_experts(model, "compressed")]
    assert sorted(qc["layers"]) == sorted(paths)
    tensors = stored(d)
    # stored keys are exactly the model's unique tensors (nothing renamed by transformers' regexes)
    # plus the load guards, which no reader counts
    keys = set(model.state_dict())
    unique = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers() if n in keys}
    guards = load_guards(model)
    assert set(tensors) == unique | set(guards) and LOAD_NOTICE_KEY in guards
    assert all(torch.equal(tensors.pop(k), v) for k, v in guards.items())
    for k in tensors:
        if ".experts." in k:
            leaf = k.split(".experts.")[1]
            assert leaf.startswith(("core_", "basis_", "delta_", "ragged_", "wrap_", "bias_")), k
    # statistics count exactly the stored tensors: parameters the float ones (a form's integer
    # index tensors, the ragged form's per-expert ranks, are bytes, not parameters), bytes all
    stats = read_statistics_yaml(d / STATS_FILENAME)
    floats = {k: t for k, t in tensors.items() if t.is_floating_point()}
    assert len(floats) == len(tensors) - (3 * len(paths) if form == "ragged" else 0)
    assert stats["model"]["params_compressed"] == sum(t.numel() for t in floats.values())
    assert stats["total_params_compressed"] == sum(t.numel() for k, t in floats.items() if ".experts." in k)
    assert stats["model"]["bytes_compressed"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert stats == json.loads(json.dumps(moecore.statistics(model)))
    cfg = moecore.CompressionConfig.load(d)
    assert cfg == ccfg(form)


@pytest.fixture(scope="module")
def exported(saved, tmp_path_factory):
    """Dense exports of every case, loaded in ONE subprocess that never imports moecore."""
    root = tmp_path_factory.mktemp("dense")
    dirs = {}
    for (family, form), (model, _, _) in saved.items():
        dirs[(family, form)] = moecore.export_dense(model, root / f"{family}-{form}")
    script = (
        "import sys, torch\n"
        "from safetensors.torch import save_file\n"
        "from transformers import AutoModelForCausalLM\n"
        "ids = torch.tensor(%r)\n"
        "out = {}\n"
        "for i, d in enumerate(sys.argv[1:]):\n"
        "    m = AutoModelForCausalLM.from_pretrained(d).eval()\n"
        "    assert getattr(m.config, 'quantization_config', None) is None\n"
        "    assert all(type(mod).__module__.startswith(('transformers', 'torch')) for mod in m.modules())\n"
        "    with torch.no_grad():\n"
        "        out[str(i)] = m(ids).logits.contiguous()\n"
        "assert not any(k.startswith('moecore') for k in sys.modules), 'moecore was imported'\n"
        "save_file(out, '%s')\n" % (input_ids().tolist(), root / "logits.safetensors")
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    keys = list(dirs)
    r = subprocess.run([sys.executable, "-c", script, *(str(dirs[k]) for k in keys)], cwd=root, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    got = load_file(str(root / "logits.safetensors"))
    return {k: (dirs[k], got[str(i)]) for i, k in enumerate(keys)}


@pytest.mark.parametrize("family,form", CASES)
def test_export_dense_loads_in_stock_transformers(saved, exported, family, form):
    _, ref, _ = saved[(family, form)]
    d, dense_logits = exported[(family, form)]
    assert "quantization_config" not in json.loads((d / "config.json").read_text())
    assert not (d / "moecore_config.json").exists()
    torch.testing.assert_close(dense_logits, ref, rtol=1e-4, atol=1e-4)
    assert not torch.equal(dense_logits, torch.zeros_like(dense_logits))


@pytest.mark.parametrize("family,form", CASES)
def test_streamed_export_equals_the_in_memory_export(saved, exported, family, form, tmp_path):
    """``moecore export`` (:func:`export_checkpoint`: the saved folder, one layer at a time,
    never the whole model) writes the same tensors under the same names, bit for bit, and the
    same config as :func:`moecore.export_dense` of the loaded model; over ``max_shard_size`` it
    shards with an index that covers every tensor."""
    _, _, src = saved[(family, form)]
    dense_dir, _ = exported[(family, form)]
    want = stored(dense_dir)
    one = export_checkpoint(src, tmp_path / "one", progress=False)
    assert sorted(p.name for p in one.glob("*.safetensors")) == ["model.safetensors"]
    got = stored(one)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) and got[k].dtype == want[k].dtype for k in want)
    assert json.loads((one / "config.json").read_text()) == json.loads((dense_dir / "config.json").read_text())
    if (family, form) == ("deepseek_v3", "ragged"):  # shards: same tensors, and an index naming each one's file
        many = export_checkpoint(src, tmp_path / "many", progress=False, max_shard_size=sum(
            t.numel() * t.element_size() for t in want.values()) // 3)
        index = json.loads((many / INDEX).read_text())
        assert len({*index["weight_map"].values()}) >= 3 and set(index["weight_map"]) == set(want)
        assert all(torch.equal(t, want[k]) for k, t in stored(many).items())


def test_loads_in_requested_dtype(saved, tmp_path):
    model, _, d = saved[("mixtral", "delta")]
    orig = model.model.layers[0].mlp.experts
    for dt in (torch.bfloat16, torch.float16):
        m = AutoModelForCausalLM.from_pretrained(d, dtype=dt)
        e = m.model.layers[0].mlp.experts
        assert e.core_gate.dtype == dt and e.delta_a_up.dtype == dt and m.model.embed_tokens.weight.dtype == dt
        assert torch.equal(e.delta_b_down, orig.delta_b_down.to(dt))
    # built in bf16 (``.to(bf16)`` would also cast the fp32 rotary tables, unlike from_pretrained)
    bf = moecore.compress(build("qwen3_moe", dtype=torch.bfloat16), ccfg("delta"))
    assert bf.model.layers[0].mlp.experts.core_up.dtype == torch.bfloat16
    d2 = moecore.save_compressed(bf, tmp_path / "bf16")
    m2 = AutoModelForCausalLM.from_pretrained(d2, dtype="auto")
    assert m2.dtype == torch.bfloat16 and torch.equal(logits(m2), logits(bf))
    # a loaded model re-saves (save_compressed or plain save_pretrained) bit-identically
    d3 = moecore.save_compressed(m2, tmp_path / "resaved")
    assert moecore.CompressionConfig.load(d3) == ccfg("delta")  # the record survives load -> save
    m2.save_pretrained(tmp_path / "plain")
    for again in (d3, tmp_path / "plain"):
        assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(again, dtype="auto")), logits(bf))


def test_quantizer_registration_and_training_flags(saved):
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    assert AUTO_QUANTIZER_MAPPING["moecore"] is MoecoreHfQuantizer
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["moecore"] is MoecoreQuantizationConfig
    m = AutoModelForCausalLM.from_pretrained(saved[("olmoe", "wrapper")][2])
    q = m.hf_quantizer
    assert q.is_trainable and q.is_qat_trainable and q.is_serializable() and not q.requires_calibration
    m.train()
    out = m(input_ids(), labels=input_ids())
    out.loss.backward()
    g = m.model.layers[0].mlp.experts.wrap_u_in_gate.grad
    assert g is not None and g.abs().sum() > 0


def test_missing_tensor_is_an_error_not_a_random_init(saved, tmp_path):
    _, _, d = saved[("mixtral", "delta")]
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in d.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    sd = load_file(str(bad / "model.safetensors"))
    sd.pop("model.layers.1.mlp.experts.delta_a_up")
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.experts.delta_a_up"):
        AutoModelForCausalLM.from_pretrained(bad)


def test_corrupt_or_missing_files_give_clear_errors(saved, tmp_path):
    _, _, d = saved[("qwen2_moe", "delta")]
    bad = tmp_path / "corrupt"
    bad.mkdir()
    for f in d.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    raw = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="corrupt safetensors"):
        load_model(bad)
    (bad / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no safetensors"):
        load_model(bad)
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nope")
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["layers"] = {"model.layers.0.mlp.experts": {"gate": 0, "up": 4, "down": 4}}
    (bad / "model.safetensors").write_bytes(raw)
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="bad ranks"):
        load_model(bad)


def test_save_is_atomic_and_refuses_to_clobber(saved, tmp_path, monkeypatch):
    model, ref, _ = saved[("mixtral", "wrapper")]
    out = moecore.save_compressed(model, tmp_path / "out")
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    with pytest.raises(CheckpointError, match="already exists"):
        moecore.save_compressed(model, out)
    import moecore.io as mio

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(mio, "write_statistics_yaml", boom)  # the name save_compressed calls
    with pytest.raises(RuntimeError, match="disk full"):
        moecore.save_compressed(model, out, overwrite=True)
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before  # old checkpoint untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp folders left behind
    monkeypatch.undo()
    moecore.save_compressed(model, out, overwrite=True)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(out)), ref)
    (tmp_path / "notamodel").mkdir()
    (tmp_path / "notamodel" / "precious.txt").write_text("x")
    with pytest.raises(CheckpointError, match="refusing"):
        moecore.save_compressed(model, tmp_path / "notamodel", overwrite=True)
    with pytest.raises(UnsupportedModelError, match="compress"):
        moecore.save_compressed(build("mixtral"), tmp_path / "plain")


def test_loading_without_moecore_fails_naming_import_moecore(saved, tmp_path):
    """In a fresh interpreter that never imports moecore, transformers refuses a compressed
    checkpoint (its load report names ``import moecore``) instead of running random experts;
    a compressed model saved again (as recover and distill do) keeps its guards and its card."""
    model, ref, d = saved[("qwen3_moe", "delta")]
    again = moecore.save_compressed(AutoModelForCausalLM.from_pretrained(d), tmp_path / "again", max_shard_size="20KB")
    assert (again / "model.safetensors.index.json").is_file()  # sharded: the guards are one more shard
    loaded, info = AutoModelForCausalLM.from_pretrained(again, output_loading_info=True)
    assert not any(info.values()) and torch.equal(logits(loaded), ref)
    card = (again / "README.md").read_text()
    assert "import moecore" in card and "pip install moecore" in card and "moecore_quality: null" in card
    code = ("import sys, transformers\nfrom transformers import AutoModelForCausalLM\n"
            "assert 'moecore' not in sys.modules\nAutoModelForCausalLM.from_pretrained(sys.argv[1])\n")
    for folder in (d, again):
        r = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
        assert r.returncode != 0 and "ignore_mismatched_sizes" in r.stderr, r.stderr[-2000:]
        assert "`import moecore` before from_pretrained" in r.stderr, r.stderr[-2000:]


def test_safetensors_headers_are_valid(saved):
    _, _, d = saved[("gpt_oss", "wrapper")]
    with safe_open(str(d / "model.safetensors"), framework="pt") as fh:
        assert fh.metadata().get("format") == "pt"
        assert "model.layers.0.mlp.experts.bias_gate_up" in fh.keys()


@pytest.mark.parametrize("family,form", CASES)
def test_plain_save_pretrained_round_trips(saved, family, form, tmp_path):
    """``moecore.compress`` marks the model like a transformers quantizer does, so the plain
    ``model.save_pretrained(dir)`` users call reloads bit-identically (not with random experts)."""
    model, ref, _ = saved[(family, form)]
    fresh = moecore.compress(build(family), ccfg(form))  # as returned by compress, never through save_compressed
    assert fresh.config.quantization_config.quant_method == "moecore" and fresh.hf_quantizer is not None
    assert torch.equal(logits(fresh), ref)
    fresh.save_pretrained(tmp_path / "plain")
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.equal(logits(loaded), ref)


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_tampered_layout_malformed_record_and_uncovered_layer_are_errors(saved, tmp_path):
    _, ref, d = saved[("mixtral", "delta")]
    bad = _copy(d, tmp_path / "layout")
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["layout"]["transposed"] = True  # would export transposed dense weights
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="does not match the model's experts layout"):
        AutoModelForCausalLM.from_pretrained(bad)
    bad = _copy(d, tmp_path / "record")
    (bad / "moecore_config.json").write_text('{"form": "delta", "rank": "four"')
    with pytest.raises(CheckpointError, match="malformed .*moecore_config.json"):
        AutoModelForCausalLM.from_pretrained(bad)
    bad = _copy(d, tmp_path / "uncovered")  # layer 1's compressed tensors are stored but not listed
    del cfg["quantization_config"]["layers"]["model.layers.1.mlp.experts"]
    cfg["quantization_config"]["layout"]["transposed"] = False
    (bad / "config.json").write_text(json.dumps(cfg))
    for load in (lambda p: load_model(p, need_tokenizer=False), AutoModelForCausalLM.from_pretrained):
        with pytest.raises(CheckpointError, match=r"compressed tensors for layer 1 \(e\.g\. .*\), which its "
                                                  "quantization_config does not list"):
            load(bad)  # one error naming the layer, in every command as in from_pretrained
    bad = _copy(d, tmp_path / "rank")  # a changed rank: the stored factors no longer fit the entry
    entry = cfg["quantization_config"]["layers"] = json.loads((d / "config.json").read_text())["quantization_config"]["layers"]
    entry["model.layers.0.mlp.experts"]["gate"] += 1
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"has shape \(.*\), but the quantization_config's entry for "
                                              r"model\.layers\.0\.mlp\.experts"):
        AutoModelForCausalLM.from_pretrained(bad)
    assert torch.equal(logits(load_model(d, need_tokenizer=False)[0]), ref)  # the original still loads


def test_registration_uses_transformers_public_decorators_and_is_idempotent():
    import importlib

    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    from moecore import hf_integration

    before = (AUTO_QUANTIZATION_CONFIG_MAPPING["moecore"], AUTO_QUANTIZER_MAPPING["moecore"])
    hf_integration.register()
    importlib.reload(hf_integration)  # a second import registers nothing more and raises nothing
    assert (AUTO_QUANTIZATION_CONFIG_MAPPING["moecore"], AUTO_QUANTIZER_MAPPING["moecore"]) == before
    src = Path(hf_integration.__file__).read_text(encoding="utf-8")
    assert "register_quantizer(" in src and "_assign_is_quantized" not in src and ".setdefault(" not in src
