"""Layer-wise local recovery: original experts read per layer from safetensors are exact, and
fitting lowers every layer's output error; the CLI saves a loadable compressed model."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import moecore
from moecore import CompressionConfig
from moecore.cli import main
from moecore.data import load_split
from moecore.training import recover
from moecore.training.config import RecoveryConfig
from moecore.training.originals import OriginalExpertsLoader

from ._tiny_models import save_tiny


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("rec") / "teacher", seed=1)


def test_original_experts_loaded_per_layer_are_exact(teacher_dir):
    full = AutoModelForCausalLM.from_pretrained(teacher_dir)
    loader = OriginalExpertsLoader(teacher_dir)
    for path in ("model.layers.0.mlp.experts", "model.layers.1.mlp.experts"):
        got, ref = loader.experts(path).state_dict(), full.get_submodule(path).state_dict()
        assert list(got) == list(ref)
        assert all(torch.equal(got[k], ref[k]) for k in ref)
    # only parameters of the requested layer are real; the skeleton stays on meta
    assert all(p.is_meta for p in loader.skeleton.parameters())


def test_recover_lowers_each_layer_error(teacher_dir):
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    student = copy.deepcopy(teacher)
    moecore.compress(student, CompressionConfig(form="delta", rank=4))
    cores = {n: p.detach().clone() for n, p in student.named_parameters() if ".core_" in n}
    rep = recover(teacher_dir, student, RecoveryConfig(steps=60, lr=0.05, max_tokens=2048, seq_len=128),
                  calibration=load_split("calib")[:20])
    assert [r["path"] for r in rep.layers] == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    for r in rep.layers:
        assert r["rel_mse_after"] < 0.7 * r["rel_mse_before"], r
    # cores were not trained (default), factors were
    assert all(torch.equal(cores[n], p) for n, p in student.named_parameters() if n in cores)
    # the same fit with an in-memory teacher gives the same first-layer starting error
    other = copy.deepcopy(teacher)
    moecore.compress(other, CompressionConfig(form="delta", rank=4))
    rep2 = recover(teacher, other, RecoveryConfig(steps=0, max_tokens=2048, seq_len=128),
                   calibration=load_split("calib")[:20], tokenizer=_tok(teacher_dir))
    assert rep2.layers[0]["rel_mse_before"] == pytest.approx(rep.layers[0]["rel_mse_before"], rel=1e-5)


def _tok(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def test_recover_cli_saves_loadable_model(teacher_dir, tmp_path, capsys):
    comp = tmp_path / "comp"
    assert main(["compress", "--no-calib", str(teacher_dir), "-o", str(comp), "--rank", "4", "--quiet"]) == 0
    out = tmp_path / "rec"
    assert main(["recover", "--teacher", str(teacher_dir), "--student", str(comp), "-o", str(out),
                 "--steps", "20", "--max-tokens", "1024", "--seq-len", "128", "--json"]) == 0
    import json

    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert all(r["rel_mse_after"] <= r["rel_mse_before"] for r in report["layers"])
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model.model.layers[1].mlp.experts).__name__ == "CompressedExperts"
    # the recovery settings are saved beside the recovered weights
    assert RecoveryConfig.load(out) == RecoveryConfig(steps=20, max_tokens=1024, seq_len=128)
    assert main(["recover", "--teacher", str(teacher_dir), "--student", str(teacher_dir), "-o",
                 str(tmp_path / "x")]) == 2
