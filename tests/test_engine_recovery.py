"""In-engine recovery (``CompressionConfig.recover_steps``, :mod:`moecore.block_recovery`):
each layer's held-out block error falls, streamed == in memory with it on, cores train only
when asked, bad values are ConfigErrors; ``moecore recover`` runs linear in depth."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import moecore
from moecore.api import compress_checkpoint
from moecore import block_recovery
from moecore.block_recovery import heldout_rows, sequence_ids
from moecore.cli import main
from moecore.config import CompressionConfig
from moecore.data import load_split
from moecore.errors import ConfigError
from moecore.families import find_experts
from moecore.training import recover
from moecore.training.config import RecoveryConfig

from .test_compress import build
from ._tiny_models import tokenizer

CALIB = dict(calib_max_tokens=1536, calib_seq_len=48, refine_steps=2)  # 32 sequences: 6 held out


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


@pytest.fixture(scope="module")
def texts():
    return load_split("calib")[:24]


def _recovery(model):
    return [m.report.get("recovery") for _, m, _ in find_experts(model, "compressed")]


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_recovery_lowers_each_layers_heldout_block_error(family, tok, texts):
    model = build(family)
    base = moecore.compress(copy.deepcopy(model), CompressionConfig(rank=3, recover_steps=0, **CALIB), texts, tok,
                            progress=False)
    rec = moecore.compress(model, CompressionConfig(rank=3, recover_steps=40, recover_train_core=False, **CALIB), texts,
                           tok, progress=False)
    assert _recovery(base) == [None, None]  # recover_steps=0: zero-shot only
    reports = _recovery(rec)
    assert len(reports) == 2
    for r in reports:
        assert r["kept"] and 16 <= r["heldout_rows"] < r["rows"]
        assert r["val_rel_mse_after"] < 0.9 * r["val_rel_mse_before"], r  # held-out sequences
        assert r["rel_mse_after"] < 0.9 * r["rel_mse_before"], r
    # the first layer's inputs are the same in both runs: its "before" is the zero-shot fit's error
    first = dict(find_experts(base, "compressed")[0][1].named_parameters())
    trained = dict(find_experts(rec, "compressed")[0][1].named_parameters())
    for n, p in trained.items():
        assert torch.equal(p, first[n]) == (n.startswith(("core_", "bias_"))), n  # factors trained, core not


def test_train_core_and_no_gain_restores(tok, texts):
    model = build("mixtral")
    rec = moecore.compress(copy.deepcopy(model), CompressionConfig(rank=3, recover_steps=20, **CALIB), texts, tok,
                           progress=False)  # default: cores trained too
    base = moecore.compress(copy.deepcopy(model), CompressionConfig(rank=3, recover_steps=0, **CALIB), texts, tok,
                            progress=False)
    a = find_experts(rec, "compressed")[0][1]
    b = find_experts(base, "compressed")[0][1]
    assert a.report["recovery"]["kept"]
    assert not torch.equal(a.core_gate, b.core_gate)  # cores trained too
    # a step size that only hurts: every layer restored to its zero-shot fit, bit for bit
    bad = moecore.compress(copy.deepcopy(model), CompressionConfig(rank=3, recover_steps=3, recover_lr=1.0, **CALIB),
                           texts, tok, progress=False)
    for (_, m, _), (_, ref, _) in zip(find_experts(bad, "compressed"), find_experts(base, "compressed")):
        r = m.report["recovery"]
        assert not r["kept"] and r["val_rel_mse_after"] == r["val_rel_mse_before"]
        assert all(torch.equal(p, q) for p, q in zip(m.parameters(), ref.parameters()))


@pytest.mark.parametrize("train_core", [False, True])
def test_ragged_trains_padded_exactly_as_compact(train_core, tok, texts):
    """The ragged form trains as the delta form on factors padded to the largest expert rank
    (:meth:`CompressedExperts.training_copy`): the padded columns get exactly zero gradients and
    stay zero, so the trained factors equal, bit for bit, Adam on the compact factors through the
    ragged forward's gather (what recovery did before)."""
    model = build("qwen3_moe")
    orig = copy.deepcopy(find_experts(model, "original")[0][1])
    moecore.compress(model, CompressionConfig(form="ragged", rank=3, recover_steps=0, **CALIB), texts, tok,
                     progress=False)
    module, layout = find_experts(model, "compressed")[0][1:]
    assert len(set(module.ragged_r_down.tolist())) > 1  # ranks differ: padding happens
    g = torch.Generator().manual_seed(3)
    x = torch.randn(200, module.hidden_size, generator=g)
    idx = torch.stack([torch.randperm(module.num_experts, generator=g)[:2] for _ in range(200)])
    w = torch.softmax(torch.randn(200, 2, generator=g), -1)
    y = block_recovery.block_targets(orig, layout, x, idx, w)
    params = block_recovery.trainable(module, train_core)
    sizes = block_recovery.step_sizes([p for _, p in params], 0.02)
    # reference: the compact factors trained through the ragged forward
    ref = copy.deepcopy(module)
    block_recovery._fit(ref, [n for n, _ in params], sizes, block_recovery.block_loss(layout, ref, x, idx, w, y), 200,
                        x.device, steps=6, batch_tokens=64, generator=torch.Generator().manual_seed(0), where="ref")
    work, names = module.training_copy(torch.float32)
    assert work.form == "delta" and work.ranks["down"] == int(module.ragged_r_down.max())
    block_recovery._fit(work, [names[n] for n, _ in params], sizes, block_recovery.block_loss(layout, work, x, idx, w, y),
                        200, x.device, steps=6, batch_tokens=64, generator=torch.Generator().manual_seed(0),
                        where="padded")
    for p in ("gate", "up", "down"):  # columns past each expert's rank: still exactly zero
        r = getattr(module, f"ragged_r_{p}")
        past = torch.arange(work.ranks[p])[None, :] >= r[:, None]  # (E, m)
        assert not work.get_parameter(f"delta_a_{p}").permute(0, 2, 1)[past].any()
        assert not work.get_parameter(f"delta_b_{p}").permute(0, 2, 1)[past].any()
    trained = copy.deepcopy(module)
    trained.load_trained(work, names, [n for n, _ in params])
    for n, q in ref.named_parameters():
        assert torch.equal(trained.get_parameter(n), q), n
        assert torch.equal(q, module.get_parameter(n)) == (n.startswith("core_") and not train_core), n


def test_streamed_equals_in_memory_with_recovery(tmp_path, tok, texts):
    model = build("qwen3_moe")
    model.save_pretrained(tmp_path / "src", max_shard_size="100KB")
    tok.save_pretrained(tmp_path / "src")
    cfg = CompressionConfig(rank=3, recover_steps=15, **CALIB)
    compress_checkpoint(tmp_path / "src", tmp_path / "streamed", cfg, texts, progress=False)
    moecore.compress(model, cfg, texts, tok, progress=False)
    moecore.save_compressed(model, tmp_path / "memory", tokenizer=tok)
    streamed, memory = (AutoModelForCausalLM.from_pretrained(tmp_path / d, dtype=torch.float32).eval()
                        for d in ("streamed", "memory"))
    ids = torch.randint(0, len(tok), (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(streamed(ids).logits, memory(ids).logits)
    assert _recovery(streamed) == _recovery(model) and all(r["kept"] for r in _recovery(model))


def test_half_precision_layers_run_in_float32_on_cpu(tmp_path, tok, texts, monkeypatch):
    """On a CPU (whose bfloat16 GEMMs are ~100x slower than float32) the engine computes each
    bfloat16 layer in float32: the experts' calibration inputs are float32, the compressed
    layers are stored in bfloat16, every other weight is returned bit for bit, and the streamed
    and in-memory paths (both widened) give the same model."""
    import moecore.calibration as mcal

    build("qwen3_moe").to(torch.bfloat16).save_pretrained(tmp_path / "src", max_shard_size="100KB")
    tok.save_pretrained(tmp_path / "src")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "src").eval()  # as streaming reads it (rotary in float32)
    assert model.dtype == torch.bfloat16
    source = {n: p.clone() for n, p in model.named_parameters() if ".experts." not in n}
    seen = []
    grams = mcal.RoutedInputs.grams
    monkeypatch.setattr(mcal.RoutedInputs, "grams", lambda self, *a, **k: (seen.append(self.x.dtype),
                                                                          grams(self, *a, **k))[1])
    cfg = CompressionConfig(rank=3, recover_steps=5, **CALIB)
    compress_checkpoint(tmp_path / "src", tmp_path / "streamed", cfg, texts, progress=False)
    moecore.compress(model, cfg, texts, tok, progress=False)
    assert seen and set(seen) == {torch.float32}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert all(torch.equal(p, source[n]) for n, p in model.named_parameters() if n in source)
    streamed = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed").eval()
    assert streamed.dtype == torch.bfloat16
    ids = torch.randint(0, len(tok), (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(streamed(ids).logits, model(ids).logits)


@pytest.mark.parametrize("field, value", [("recover_steps", -1), ("recover_steps", 1.5), ("recover_lr", 0.0),
                                          ("recover_lr", float("nan")), ("recover_lr", 2.0),
                                          ("recover_batch_tokens", 0), ("recover_train_core", "yes")])
def test_bad_recovery_values_are_config_errors(field, value):
    with pytest.raises(ConfigError, match=field):
        CompressionConfig(**{field: value})


def test_recovery_defaults():
    cfg = CompressionConfig()
    assert (cfg.recover_steps, cfg.recover_lr, cfg.recover_batch_tokens, cfg.recover_train_core) == (200, 0.02, 1024, True)


def test_heldout_sequences_of_routed_and_dense_calls():
    shapes = [(2, 4), (1, 4)]  # batch 0: sequences 0, 1; batch 1: sequence 2
    assert sequence_ids([8, 4], shapes).tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    # a dense call (Llama-4): one block of B·L rows per expert (3 experts)
    assert sequence_ids([24], shapes[:1]).tolist() == [0] * 4 + [1] * 4 + [0] * 4 + [1] * 4 + [0] * 4 + [1] * 4
    seq = torch.arange(10).repeat_interleave(4)
    assert heldout_rows(seq, min_rows=8).nonzero().squeeze(1).tolist() == [16, 17, 18, 19, 36, 37, 38, 39]
    assert not heldout_rows(seq, min_rows=9).any()  # too few held-out rows: judged on the training rows


def test_recover_runs_each_layer_once_per_batch(tok, texts):
    """``moecore recover``: per calibration batch at most L + 1 complete decoder-layer forwards
    (here L − 1: the last layer's output is not needed) and one capture per layer stopped at
    its experts (attention and router only), instead of a model forward up to every layer."""
    teacher = build("mixtral", layers=4)
    student = moecore.compress(copy.deepcopy(teacher), CompressionConfig(rank=3, refine_steps=1), progress=False)
    layers = student.model.layers
    done, calls = [0] * len(layers), [0] * len(layers)
    hooks = [l.register_forward_hook(lambda m, a, o, i=i: done.__setitem__(i, done[i] + 1)) for i, l in enumerate(layers)]
    hooks += [l.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
              for i, l in enumerate(layers)]
    cfg = RecoveryConfig(steps=5, max_tokens=1024, seq_len=64, forward_batch=4)  # 16 sequences: 4 batches
    rep = recover(teacher, student, cfg, calibration=texts, tokenizer=tok, progress=False)
    for h in hooks:
        h.remove()
    n_layers, batches = len(layers), 4
    assert len(rep.layers) == n_layers
    assert sum(done) <= (n_layers + 1) * batches and sum(done) == (n_layers - 1) * batches
    assert calls == [2 * batches] * (n_layers - 1) + [batches]  # one stopped capture + one forward; last: capture



def test_cli_compress_reports_block_recovery(tmp_path, tok, texts, capsys):
    model = build("mixtral")
    model.save_pretrained(tmp_path / "src")
    tok.save_pretrained(tmp_path / "src")
    (tmp_path / "calib.txt").write_text("\n\n".join(texts), encoding="utf-8")
    assert main(["compress", str(tmp_path / "src"), "-o", str(tmp_path / "out"), "--rank", "3", "--calib",
                 str(tmp_path / "calib.txt"), "--calib-tokens", "1536", "--calib-seq-len", "48", "--refine-steps", "1",
                 "--recover-steps", "10", "--recover-lr", "0.03", "--device", "cpu", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "recover " in err and "block recovery (10 steps per layer): kept in 2 of 2 layer(s)" in err, err
    assert "a chunk of experts at a time" not in err
    assert main(["compress", str(tmp_path / "src"), "-o", str(tmp_path / "o3"), "--rank", "3", "--calib",
                 str(tmp_path / "calib.txt"), "--calib-tokens", "1536", "--calib-seq-len", "48", "--refine-steps", "1",
                 "--recover-steps", "10", "--recover-memory-gb", "1e-6", "--device", "cpu", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert ("2 layer(s) trained a chunk of experts at a time, factors only: their trained tensors exceed "
            "--recover-memory-gb 1e-06") in err, err
    assert main(["compress", str(tmp_path / "src"), "-o", str(tmp_path / "o2"), "--recover-steps", "-3"]) == 2
