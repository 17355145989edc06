"""Every Mixture-of-Experts family of the installed transformers, compressed for real.

The families are found by walking transformers' model types (``CONFIG_MAPPING_NAMES``) and
reading each modeling file: a family is a modeling module that defines an experts class
(``class ...Experts(``).  For each one a tiny random model is built from its own config
class (hidden 32, 2 layers, 4 experts, vocabulary 128; the config fields a family needs
beyond that are data in :data:`CASES`), then compressed with ``moecore.compress`` in BOTH
forms at full rank: the materialized experts must equal the originals and the logits (or
last hidden states, for a family without a causal-LM head) must equal the original model's;
``save_compressed`` -> ``from_pretrained`` must give bit-identical logits.  A family moecore
can't handle must raise :class:`~moecore.errors.UnsupportedModelError` (nothing else) with
the reason recorded in :data:`CASES`.  ``docs/FAMILIES.md`` is (re)written from the results.
"""
from __future__ import annotations

import copy
import gc
import importlib
import json
import math
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer
from transformers.models.auto.configuration_auto import CONFIG_MAPPING, CONFIG_MAPPING_NAMES, model_type_to_module_name
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES

import moecore
from moecore.block_recovery import routed_forward
from moecore.calibration import ExpertsInputHook
from moecore.data import load_split
from moecore.errors import UnsupportedModelError
from moecore.expert_source import InMemorySource, SourcedExperts
from moecore.families import ExpertsModule, find_experts, is_compressed
from moecore.io_utils import atomic_write_text
from moecore.surgery import replace_module
from moecore.training import RecoveryConfig, recover

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "FAMILIES.md"
MODELS_DIR = Path(transformers.__file__).parent / "models"
H, F, E, V = 32, 16, 4, 128  # hidden, expert intermediate, experts, vocabulary
MAX_PARAMS = 2_000_000  # a tiny config that still builds a bigger model is a bug in CASES
TINY: dict[str, Any] = dict(
    vocab_size=V, hidden_size=H, intermediate_size=F, moe_intermediate_size=F, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64, num_experts=E,
    num_local_experts=E, n_routed_experts=E, num_experts_per_tok=2, n_group=1, topk_group=1,
    first_k_dense_replace=0, decoder_sparse_step=1, mlp_only_layers=[], pad_token_id=0, bos_token_id=1,
    eos_token_id=2, tie_word_embeddings=False,
)


@dataclass(frozen=True)
class Case:
    """How to build one family's tiny model, and what moecore is expected to do with it.

    Attributes:
        model_type: config to build (default: the family's ``*_text`` causal LM, else its causal LM,
            else its ``*_text`` / own base model).
        model_class: a class of the modeling module to build instead of the auto classes
            (text models that transformers maps to no auto class).
        config: config fields beyond :data:`TINY` (``None`` deletes a :data:`TINY` key).
        unsupported: the reason moecore raises ``UnsupportedModelError`` (a regex of its message).
    """

    model_type: str | None = None
    model_class: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    unsupported: str | None = None


_MLA = dict(kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, num_key_value_heads=4)
_DSA = dict(_MLA, index_n_heads=2, index_head_dim=8, index_topk=4)
_MROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}
_LINEAR = dict(layer_types=["linear_attention", "full_attention"], linear_key_head_dim=8, linear_value_head_dim=8,
               linear_num_key_heads=2, linear_num_value_heads=4, shared_expert_intermediate_size=F)
CASES: dict[str, Case] = {
    "axk1": Case(config=_MLA),
    "axk2": Case(config=_MLA),
    "bailing_hybrid": Case(config=dict(_MLA, layer_types=["linear_attention", "full_attention"], num_experts_per_token=2,
                                       num_expert_group=1, linear_head_dim=8, linear_num_heads=4)),
    "beam": Case(config=dict(mlp_layer_types=["sparse", "sparse"])),
    "ergo": Case(config=dict(first_dense_intermediate_size=F, shared_intermediate_size=F, num_dense_blocks=1,
                             mlp_layer_types=None),
                 unsupported="experts without a gate projection"),
    "dbrx": Case(config=dict(d_model=H, n_heads=4, n_layers=2, max_seq_len=64,
                             attn_config={"kv_n_heads": 2, "rope_theta": 10000.0},
                             ffn_config={"ffn_hidden_size": F, "moe_num_experts": E, "moe_top_k": 2}),
                 unsupported="flattened 2-D w1/v1/w2"),
    "deepseek_ocr2": Case(model_type="deepseek_ocr2_text", model_class="DeepseekOcr2TextModel",
                          config=dict(n_shared_experts=1, mlp_layer_types=["sparse", "sparse"])),
    "deepseek_v2": Case(config=_MLA),
    "deepseek_v3": Case(config=_MLA),
    "deepseek_v32": Case(config=_DSA),
    "diffusion_gemma": Case(model_type="diffusion_gemma_text", model_class="DiffusionGemmaEncoderTextModel",
                            config=dict(num_experts=E, top_k_experts=2, enable_moe_block=True)),
    "dots1": Case(config=dict(n_shared_experts=1)),
    "dots3_note": Case(config=_DSA),
    "ernie4_5_vl_moe": Case(model_type="ernie4_5_vl_moe_text", model_class="Ernie4_5_VLMoeTextModel",
                            config=dict(moe_intermediate_size=[F, F], moe_num_experts=E, moe_k=2,
                                        mlp_layer_types=["sparse", "sparse"],
                                        rope_parameters=dict(_MROPE, mrope_section=[1, 1, 2]))),
    "gemma4": Case(config=dict(enable_moe_block=True, num_experts=E, top_k_experts=2, vocab_size_per_layer_input=V,
                               hidden_size_per_layer_input=8)),
    "glm4_moe_lite": Case(config=_MLA),
    "glm4v_moe": Case(config=dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                   "partial_rotary_factor": 0.5, "mrope_section": [1, 0, 1]})),
    "glm5_next": Case(config=dict(_DSA, qk_rope_head_dim=0, head_dim=0, linear_head_dim=8, linear_num_heads=4,
                                  mlp_layer_types=["sparse", "sparse"], index_kpool=2,
                                  layer_types=["linear_attention", "full_attention"])),
    "glm_moe_dsa": Case(config=_DSA),
    "granitemoehybrid": Case(config=dict(layer_types=["mamba", "attention"], mamba_n_heads=4, mamba_d_head=16,
                                         mamba_d_state=8, mamba_chunk_size=16, shared_intermediate_size=F)),
    "hy_v4": Case(config=_DSA),
    "hy_v4_vl": Case(config=dict(_DSA, rope_parameters=_MROPE)),
    "inkling2": Case(config=dict(swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=8, d_rel=4,
                                 unpadded_vocab_size=V)),
    "inkling2_loop": Case(config=dict(swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=8, d_rel=4,
                                      unpadded_vocab_size=V)),
    "kolibri1_1": Case(config=dict(head_dim=16, index_num_heads=2)),  # NVFP4 key/value rounding needs a multiple of 16
    "jamba": Case(config=dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=1, expert_layer_offset=0,
                              mamba_dt_rank=8, mamba_d_state=4, use_mamba_kernels=False)),
    "jetmoe": Case(unsupported="mixture-of-attention"),
    "kimi_linear": Case(config=dict(_MLA, num_experts_per_token=2, linear_head_dim=8, linear_num_heads=4,
                                    layer_types=["linear_attention", "full_attention"],
                                    mlp_layer_types=["sparse", "sparse"])),
    "lfm2_moe": Case(config=dict(layer_types=["conv", "full_attention"], num_dense_layers=0)),
    "longcat_flash": Case(config=dict(_MLA, num_layers=2, ffn_hidden_size=F, expert_ffn_hidden_size=F, moe_topk=2,
                                      zero_expert_num=2), unsupported="zero-computation"),
    "mistral4": Case(config=dict(_MLA, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                        "llama_4_scaling_beta": 0.1,
                                                        "original_max_position_embeddings": 64})),
    "mistral_large4": Case(config=_MLA),
    "muse_spark": Case(config=dict(moe_hidden_size=F), unsupported="post-expert norm"),
    "nemotron_h": Case(unsupported="without a gate projection"),
    "nllb_moe": Case(config=dict(d_model=H, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=F, decoder_ffn_dim=F,
                                 encoder_attention_heads=4, decoder_attention_heads=4, expert_capacity=8),
                     unsupported="list of separate modules"),
    "qwen3_5_moe": Case(config=_LINEAR),
    "qwen3_next": Case(config=_LINEAR),
    "qwen3_omni_moe": Case(model_type="qwen3_omni_moe_text", model_class="Qwen3OmniMoeThinkerTextModel"),
    "qwen4_exp": Case(config=dict(_LINEAR, hc_lowrank=8, ple_embed_dim=8, indexer_n_heads=2, indexer_kv_heads=1,
                                  indexer_head_dim=8, indexer_budget=4, indexer_compress_ratio=2)),
    "step3p7": Case(model_type="step3p5", model_class="Step3p7TextModel",
                    config=dict(share_expert_dim=F, num_sliding_attention_heads=4, query_pre_attn_scalar=8,
                                mlp_layer_types=["sparse", "sparse"], sliding_window=16)),
    "switch_transformers": Case(config=dict(d_model=H, d_ff=F, d_kv=8, num_heads=4, num_layers=2, num_decoder_layers=2,
                                            num_sparse_encoder_layers=1, num_sparse_decoder_layers=1,
                                            relative_attention_num_buckets=8),
                                unsupported="list of separate modules"),
    "unlimited_ocr": Case(model_type="unlimited_ocr_text", model_class="UnlimitedOcrTextModel"),
    "zaya": Case(config=dict(num_experts_per_tok=1, router_hidden_size=8)),
}


def families() -> dict[str, list[str]]:
    """Modeling module -> its model types, for every modeling file that defines an experts class."""
    out: dict[str, list[str]] = {}
    for model_type in CONFIG_MAPPING_NAMES:
        module = model_type_to_module_name(model_type)
        path = MODELS_DIR / module / f"modeling_{module}.py"
        if path.is_file() and re.search(r"^class \w+Experts\(", path.read_text(encoding="utf-8"), re.M):
            out.setdefault(module, []).append(model_type)
    return out


FAMILIES = families()
#: where every worker of this run leaves its families' rows (pytest-xdist spreads the families over
#: the workers; the variable is shared by the workers of one run, absent in a one-process run)
SHARED = Path(tempfile.gettempdir()) / f"moecore-families-{os.environ.get('PYTEST_XDIST_TESTRUNUID') or uuid.uuid4().hex}"


def record(family: str, row: dict[str, str]) -> None:
    """This family's row of docs/FAMILIES.md, for whichever worker writes the file."""
    SHARED.mkdir(exist_ok=True)
    (SHARED / f"{family}.json").write_text(json.dumps(row), encoding="utf-8")


def pick_model_type(types: list[str]) -> tuple[str, bool]:
    """``(model_type, causal)``: the text causal LM if there is one, else a base model."""
    causal = [t for t in types if t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES]
    base = [t for t in types if t in MODEL_MAPPING_NAMES]
    for pool, is_causal in (([t for t in causal if t.endswith("_text")] or causal), True), \
                           (([t for t in base if t.endswith("_text")] or base), False):
        if pool:
            return pool[0], is_causal
    return types[0], False


def build(family: str, case: Case) -> tuple[nn.Module, Any, str]:
    """The tiny random model, the class that loads it back, and the model type."""
    model_type, causal = (case.model_type, case.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) \
        if case.model_type else pick_model_type(FAMILIES[family])
    kwargs = {k: v for k, v in {**TINY, **case.config}.items() if v is not None}
    config = CONFIG_MAPPING[model_type](**kwargs)
    if case.model_class:
        loader = getattr(importlib.import_module(f"transformers.models.{family}.modeling_{family}"), case.model_class)
        make = lambda: loader._from_config(config)  # noqa: E731
    else:
        loader = AutoModelForCausalLM if causal else AutoModel
        make = lambda: loader.from_config(config)  # noqa: E731
    with torch.device("meta"):
        n = sum(p.numel() for p in make().parameters())
    assert n <= MAX_PARAMS, f"{family}: the tiny config still builds {n:,} parameters; add fields to CASES"
    torch.manual_seed(0)
    model = make().eval()
    return model, loader, model_type


def redraw_experts(model: nn.Module) -> None:
    """Expert weights with std 1/sqrt(d_in), so that they matter in the logits (the 0.02
    default init would make the experts nearly invisible)."""
    with torch.no_grad():
        for _, module, layout in find_experts(model):
            views = layout.split(module)
            for p in ("gate", "up", "down"):
                views[p].normal_(0, 1.0 / math.sqrt(views[p].shape[-1]))
            for k in ("bias_gate_up", "bias_down"):
                if k in views:
                    views[k].normal_(0, 0.1)


def outputs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=False)
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


@pytest.fixture(scope="module", autouse=True)
def _small_model_runtime():
    """Tiny models run fastest on one thread (thread hand-offs cost more than the maths, the
    more so on a loaded machine), and the engine's garbage collection after every layer walks
    a large heap once every modeling module is imported: objects alive now are frozen out."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()
    torch.set_num_threads(threads)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family(family, tmp_path):
    case = CASES.get(family, Case())
    model, loader, model_type = build(family, case)
    row = {"model_type": model_type, "class": "", "layout": "", "status": ""}
    try:
        found = find_experts(model)
    except UnsupportedModelError as exc:
        assert case.unsupported, f"{family}: moecore raised UnsupportedModelError: {exc}"
        assert re.search(case.unsupported, str(exc)), f"{family}: {exc}"
        record(family, {**row, "status": f"unsupported: {exc}"})
        return
    assert case.unsupported is None, f"{family} works now: drop its 'unsupported' from CASES"
    row["class"] = type(found[0].module).__name__
    row["layout"] = found[0].layout.name
    redraw_experts(model)
    first, layout = found[0].module, found[0].layout
    if hasattr(first, "_apply_gate"):  # the family's own gated activation, far past any clamp
        gate_up = 30 * torch.randn(5, 2 * layout.split(first)["gate"].shape[1], generator=torch.Generator().manual_seed(4))
        gate, up = layout.split_bias(gate_up)  # same (..., 2F) split as the fused projection's output
        with torch.no_grad():
            assert torch.allclose(layout.activation_fn(getattr(first, "act_fn", None))(gate, up),
                                  first._apply_gate(gate_up), rtol=1e-5, atol=1e-5), f"{family}: activation"
    for _, m, lay in found:  # the engine's stand-in (calibration, recovery targets) computes as the family does
        if lay.call == "routed":
            e, _, h = lay.split(m)["gate"].shape
            g = torch.Generator().manual_seed(5)
            x, k = torch.randn(9, h, generator=g), min(2, e)
            idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(9)])  # (9, k)
            w = torch.rand(9, k, generator=g)
            with torch.no_grad():
                want = m(x, idx, w)
                got = SourcedExperts(InMemorySource(m, lay), lay, m)(x, idx, w)
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max())), f"{family}: routed"
    ids = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(1))
    ref = outputs(model, ids)
    originals = {path: {k: v.detach().clone() for k, v in m.named_parameters()} for path, m, _ in found}
    rank = min(min(v.shape[1:]) for _, m, lay in found for v in lay.split(m).values() if v.dim() == 3)
    for form in ("delta", "wrapper"):
        cfg = moecore.CompressionConfig(form=form, rank=rank, refine_steps=0, allow_larger=True)
        compressed = moecore.compress(copy.deepcopy(model), cfg, progress=False)
        mods = find_experts(compressed, "compressed")
        assert [f.path for f in mods] == list(originals)
        for path, m, _ in mods:
            dense = m.materialize()
            assert set(dense) == set(originals[path])
            for k, v in dense.items():
                w = originals[path][k]
                # float32 factors: the wrapper's three chained products round more than C + A Bᵀ
                tol = 1e-5 if form == "delta" else 5e-4
                assert v.shape == w.shape and float((v - w).norm() / w.norm()) < tol, (path, k)
        out = outputs(compressed, ids)
        scale = max(1.0, float(ref.abs().max())) * (1e-4 if form == "delta" else 5e-4)
        diff = float((out - ref).abs().max())
        assert diff < scale, f"{family} {form}: outputs differ by {diff:.3g} (tolerance {scale:.3g})"
        saved = moecore.save_compressed(compressed, tmp_path / form)
        loaded = loader.from_pretrained(saved).eval()
        assert [f.path for f in find_experts(loaded, "compressed")] == list(originals)
        assert torch.equal(outputs(loaded, ids), out), f"{family} {form}: reloaded outputs differ"
    record(family, {**row, "status": "works"})


def test_find_experts_modes_and_is_compressed():
    """One discovery function for original, compressed or all experts; one is_compressed."""
    model = build("mixtral", Case())[0]
    found = find_experts(model)
    paths = [f.path for f in found]
    assert all(isinstance(f.module, ExpertsModule) and not f.compressed for f in found)
    compressed = moecore.compress(copy.deepcopy(model), moecore.CompressionConfig(rank=4, refine_steps=0), progress=False)
    assert is_compressed(compressed, recurse=True) and not is_compressed(model, recurse=True)
    assert [f.path for f in find_experts(compressed, "compressed")] == paths
    assert [(f.path, f.compressed) for f in find_experts(compressed, "all")] == [(p, True) for p in paths]
    with pytest.raises(UnsupportedModelError, match="already compressed by moecore"):
        find_experts(compressed)
    with pytest.raises(UnsupportedModelError, match="no moecore-compressed experts"):
        find_experts(model, "compressed")
    assert find_experts(model, "compressed", required=False) == []
    replace_module(model, paths[0], compressed.get_submodule(paths[0]))  # half compressed: both kinds, model order
    assert [(f.path, f.compressed) for f in find_experts(model, "all")] == [(paths[0], True), (paths[1], False)]
    assert [f.path for f in find_experts(model)] == paths[1:]


def test_llama4_dense_prescaled_call_and_calibration():
    """Llama-4 calls its experts with every token repeated per expert, ``(E·T, H)``, each row
    already multiplied by its router score (0 for the experts a token is not routed to): the
    compressed module takes the same call, and calibration keeps the routed rows only."""
    model = build("llama4", Case())[0]
    redraw_experts(model)
    path, orig, layout = find_experts(model)[0]
    assert layout.call == "dense_prescaled" and layout.transposed and not layout.has_bias
    new = moecore.compress(copy.deepcopy(model), moecore.CompressionConfig(rank=F, refine_steps=0, allow_larger=True),
                           progress=False).get_submodule(path)
    x = torch.randn(E * 5, H, generator=torch.Generator().manual_seed(2))
    x[::3] = 0  # rows of experts a token is not routed to
    with torch.no_grad():
        assert torch.allclose(new(x), orig(x), atol=1e-5)
    hook = ExpertsInputHook(layout=layout)
    handle = orig.register_forward_pre_hook(hook, with_kwargs=True)
    outputs(model, torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(3)))
    handle.remove()
    inputs = hook.inputs(E, "routing")
    assert int(inputs.counts.sum()) == 2 * 7 * model.config.num_experts_per_tok  # routed (token, expert) pairs
    assert bool((inputs.weight == 1).all())  # the router score is in the rows already



def test_llama4_layerwise_recovery(tmp_path):
    """Layer-wise recovery compares original and compressed Llama-4 experts on the same routed
    rows: the original's per-expert evaluation equals its own dense call, and every layer's
    error on the rows it was fitted on goes down (read from a saved teacher directory)."""
    tok = AutoTokenizer.from_pretrained(ROOT / "data" / "tokenizer")
    model = build("llama4", Case(config={"vocab_size": len(tok)}))[0]
    redraw_experts(model)
    path, orig, layout = find_experts(model)[0]
    x = torch.randn(E * 6, H, generator=torch.Generator().manual_seed(4))
    x[1::2] = 0  # half the (expert, token) rows unrouted
    xr, idx, w = layout.routed_call(x, None, None, E, skip_unrouted=True)
    with torch.no_grad():
        dense = orig(x)  # (E*6, H)
        routed = routed_forward(layout, orig, xr, idx, w)
    assert torch.allclose(routed, torch.where(idx >= 0, dense, 0.0), atol=1e-6)
    model.save_pretrained(tmp_path / "teacher")
    student = moecore.compress(copy.deepcopy(model), moecore.CompressionConfig(rank=2, refine_steps=0), progress=False)
    rep = recover(tmp_path / "teacher", student, RecoveryConfig(steps=40, lr=1e-2, max_tokens=1024, seq_len=32),
                  calibration=load_split("calib")[:10], tokenizer=tok, progress=False)
    assert [r["path"] for r in rep.layers] == [p for p, _, _ in find_experts(student, "compressed")]
    for r in rep.layers:
        assert r["rel_mse_after"] < r["rel_mse_before"]


@pytest.fixture(scope="session", autouse=True)
def families_md():
    """docs/FAMILIES.md from this run's results, written when a worker's session ends and every
    family ran and passed in some worker of the run (the last worker to end writes it; two
    that end together write the same bytes)."""
    yield
    rows = {f.stem: json.loads(f.read_text(encoding="utf-8")) for f in SHARED.glob("*.json")} if SHARED.is_dir() else {}
    if set(rows) != set(FAMILIES):
        return
    works = sum(r["status"] == "works" for r in rows.values())
    lines = [
        "# MoE families of the installed transformers",
        "",
        f"Generated by `tests/test_families.py` with transformers {transformers.__version__}: every modeling",
        "module that defines an experts class, built tiny from its own config, compressed in both forms",
        "at full rank (exact materialized experts and logits) and saved/reloaded (bit-identical logits).",
        "`unsupported` rows are the `UnsupportedModelError` moecore raises for them.",
        "",
        f"{works} of {len(rows)} families work.",
        "",
        "| family | model type tested | experts class | layout | status |",
        "|---|---|---|---|---|",
    ]
    for family in sorted(rows):
        r = rows[family]
        status = r["status"].replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {family} | {r['model_type']} | {r['class'] or '-'} | {r['layout'] or '-'} | {status} |")
    atomic_write_text(DOC, "\n".join(lines) + "\n")
    shutil.rmtree(SHARED, ignore_errors=True)
