"""Recovery of a layer too large to train at once (``recover_memory_gb``,
:func:`moecore.block_recovery.train_experts_in_chunks`): the chunk's loss is the block's
error exactly, the chunk size follows the memory limit, the held-out error falls, the cores
stay, a chunk that does not help is restored bit for bit, and ``plan`` counts a chunk."""
from __future__ import annotations

import copy
import math

import pytest
import torch

import moecore
from moecore import block_recovery, recovery_chunks
from moecore.config import CompressionConfig, RecoveryConfig
from moecore.errors import ConfigError
from moecore.families import find_experts
from moecore.forms import PROJECTIONS
from moecore.planning import plan

from .test_compress import build
from .test_engine_recovery import CALIB, tok, texts  # noqa: F401  (fixtures)

GIB = 1 << 30


def _compressed(form: str, tok, texts, **kw):
    model = build("qwen3_moe")
    orig = copy.deepcopy(find_experts(model, "original")[0][1])
    moecore.compress(model, CompressionConfig(form=form, rank=3, recover_steps=0, **CALIB, **kw), texts, tok,
                     progress=False)
    return model, orig, *find_experts(model, "compressed")[0][1:]


def _rows(module, n=300, k=2, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, module.hidden_size, generator=g)
    idx = torch.stack([torch.randperm(module.num_experts, generator=g)[:k] for _ in range(n)])
    w = torch.softmax(torch.randn(n, k, generator=g), -1)
    return x, idx, w


def _per_expert(module) -> int:
    """Trained elements of one expert: the training form's factors, padded as it trains them."""
    form = module.form_impl
    return sum(math.prod(t.shape[1:]) for p in PROJECTIONS for t in form.to_training(module.stored, p))


@pytest.mark.parametrize("form", ["ragged", "delta"])
def test_the_chunks_outputs_sum_to_the_modules_output(form, tok, texts):
    """Recovery in chunks runs the module a chunk of experts at a time: each chunk, a module of
    its own padded to its largest rank, gives its experts' pairs summed back to the rows, and
    the chunks' outputs add up to the whole module's forward."""
    _, _, module, layout = _compressed(form, tok, texts)
    x, idx, w = _rows(module)
    whole = block_recovery.routed_forward(layout, module, x, idx, w)  # (N, H)
    e = module.num_experts
    parts = [(0, 1), (1, 3), (3, e)]
    outs = []
    for a, b in parts:
        part = recovery_chunks.chunk_module(module, a, b, torch.float32)
        assert part.num_experts == b - a and part.form == "delta"
        outs.append(recovery_chunks.part_output(part, a, b, x, idx, w))
        none = ~((idx >= a) & (idx < b)).any(1)
        assert none.any() and not outs[-1][none].any()  # rows without a pair in the chunk: nothing
    torch.testing.assert_close(sum(outs), whole, rtol=1e-5, atol=1e-5 * float(whole.abs().max()))


def test_the_chunk_follows_the_memory_limit(tok, texts):
    _, _, module, _ = _compressed("ragged", tok, texts)
    per = _per_expert(module)
    assert per > 0
    assert recovery_chunks.expert_chunk(module, 3 * 24 * per / GIB) == 3
    assert recovery_chunks.expert_chunk(module, 0.5 * 24 * per / GIB) == 1  # at least one expert
    assert recovery_chunks.expert_chunk(module, module.num_experts * 24 * per / GIB) is None  # all fit: one module
    assert recovery_chunks.expert_chunk(module, None) is None
    _, _, basis, _ = _compressed("basis", tok, texts)
    assert recovery_chunks.expert_chunk(basis, 1e-9) is None  # shared bases: not split by experts


def test_chunked_recovery_lowers_the_heldout_error_and_keeps_the_cores(tok, texts):
    model = build("qwen3_moe")
    base = moecore.compress(copy.deepcopy(model), CompressionConfig(rank=3, recover_steps=0, **CALIB), texts, tok,
                            progress=False)
    module = find_experts(base, "compressed")[0][1]
    limit = 2 * 24 * _per_expert(module) / GIB  # two experts at a time
    rec = moecore.compress(copy.deepcopy(model), CompressionConfig(rank=3, recover_steps=40, recover_memory_gb=limit,
                                                                   **CALIB), texts, tok, progress=False)
    for (_, m, _), (_, ref, _) in zip(find_experts(rec, "compressed"), find_experts(base, "compressed")):
        r = m.report["recovery"]
        assert r["expert_chunks"] == math.ceil(m.num_experts / 2) and r["trained_core"] is False
        assert r["params"] == sum(p.numel() for n, p in m.named_parameters() if not n.startswith(("core_", "bias_")))
        assert r["kept"] and r["kept_chunks"] >= 1
        assert r["val_rel_mse_after"] < 0.95 * r["val_rel_mse_before"], r
        assert r["rel_mse_after"] < r["rel_mse_before"], r
    first, ref = find_experts(rec, "compressed")[0][1], find_experts(base, "compressed")[0][1]
    for n, p in first.named_parameters():  # the first layer sees the same inputs in both runs
        assert torch.equal(p, ref.get_parameter(n)) == n.startswith("core_"), n  # cores as fitted, factors trained


def test_a_chunk_that_does_not_help_is_restored_bit_for_bit(tok, texts):
    model = build("qwen3_moe")
    base = moecore.compress(copy.deepcopy(model), CompressionConfig(rank=3, recover_steps=0, **CALIB), texts, tok,
                            progress=False)
    limit = 3 * 24 * _per_expert(find_experts(base, "compressed")[0][1]) / GIB
    bad = moecore.compress(copy.deepcopy(model), CompressionConfig(rank=3, recover_steps=3, recover_lr=1.0,
                                                                   recover_memory_gb=limit, **CALIB),
                           texts, tok, progress=False)
    for (_, m, _), (_, ref, _) in zip(find_experts(bad, "compressed"), find_experts(base, "compressed")):
        r = m.report["recovery"]
        assert r["kept_chunks"] == 0 and not r["kept"] and r["val_rel_mse_after"] == r["val_rel_mse_before"]
        assert all(torch.equal(p, q) for p, q in zip(m.parameters(), ref.parameters()))


def test_bad_memory_limits_are_config_errors():
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ConfigError, match="recover_memory_gb"):
            CompressionConfig(recover_memory_gb=bad)
        with pytest.raises(ConfigError, match="memory_gb"):
            RecoveryConfig(memory_gb=bad)
    assert CompressionConfig().recover_memory_gb == RecoveryConfig().memory_gb == 16.0


def test_plan_counts_one_chunk_of_trained_factors():
    """DeepSeek-V3 (layer 3 of the published config, 256 experts): at the defaults recovery
    trains 16 GiB of tensors at a time, not every padded factor at once (123 GiB)."""
    whole = plan("examples/configs/deepseek-v3.json", CompressionConfig(recover_memory_gb=1e6),
                 dtype="bfloat16")["memory_estimate"]
    chunked = plan("examples/configs/deepseek-v3.json", CompressionConfig(), dtype="bfloat16")["memory_estimate"]
    assert whole["gpu_gib"] > 130 and chunked["gpu_gib"] < 60, (whole, chunked)
    assert whole["gpu_gib"] - chunked["gpu_gib"] > 100


@pytest.mark.parametrize("form", ["ragged", "delta"])
def test_a_slice_of_experts_is_the_whole_training_form_cut_and_writes_back_exactly(form, tok, texts):
    _, _, module, _ = _compressed(form, tok, texts)
    impl = module.form_impl
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    for p in PROJECTIONS:
        whole = tuple(t.detach().clone() for t in impl.to_training(module.stored, p))  # (E, d, m): padded to the projection's largest rank
        for a, b in ((0, 1), (1, 3), (0, module.num_experts)):
            part = tuple(t.clone() for t in impl.training_slice(module.stored, p, a, b))  # padded to a:b's largest rank
            for t, ref in zip(part, whole):
                m = t.shape[-1]
                assert torch.equal(t, ref[a:b, :, :m]) and not ref[a:b, :, m:].any()
            with torch.no_grad():
                impl.set_training_slice(module.stored, p, a, b, tuple(2 * t for t in part))
            grown = impl.to_training(module.stored, p)
            for t, ref in zip(grown, whole):
                assert torch.equal(t[a:b], 2 * ref[a:b]) and torch.equal(t[b:], ref[b:]) and torch.equal(t[:a], ref[:a])
            with torch.no_grad():
                impl.set_training_slice(module.stored, p, a, b, part)
    for n, t in module.named_parameters():
        assert torch.equal(t, before[n]), n


def test_step_sizes_of_large_tensors_are_summed_in_blocks(monkeypatch):
    """``step_sizes`` sums a large tensor's squares a block at a time (no whole float64 copy):
    the same RMS to 1e-12; a tensor within one block is computed exactly as before."""
    g = torch.Generator().manual_seed(0)
    t = torch.randn(300, 70, generator=g) * 0.02
    exact = float(t.double().pow(2).mean().sqrt())
    assert block_recovery.step_sizes([t], 0.5) == [0.5 * exact]  # one block: bit for bit
    monkeypatch.setattr(block_recovery, "RMS_BLOCK", 1000)  # 21 blocks
    (blocked,) = block_recovery.step_sizes([t], 0.5)
    assert blocked == pytest.approx(0.5 * exact, rel=1e-12)
    assert block_recovery.step_sizes([torch.zeros(5000), t], 1.0)[0] == pytest.approx(exact, rel=1e-12)  # floor
