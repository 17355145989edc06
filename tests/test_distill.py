"""Logit distillation: the KD loss, that training lowers it while training only the factors,
and that a run killed with SIGKILL resumes from its last complete checkpoint."""
from __future__ import annotations

import copy
import json
import signal
import subprocess
import time

import pytest
import torch

import moecore
from moecore import CompressionConfig
from moecore.errors import ConfigError
from moecore.training import distill, kd_loss
from moecore.training.checkpoints import complete_checkpoints, is_complete
from moecore.training.config import DistillConfig
from moecore.training.distill import _blocks, eval_kd_loss

from ._tiny_models import python_cmd, save_tiny, subprocess_env, tiny_mixtral


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("kd") / "teacher")


def test_kd_loss_terms():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    y = torch.randint(0, 11, (2, 5))
    y[0, 3] = -100
    loss, parts = kd_loss(s, t, y, temperature=2.0, alpha=0.3)
    mask = y[:, 1:] != -100
    ps = torch.log_softmax(s[:, :-1][mask] / 2, -1)
    pt = torch.log_softmax(t[:, :-1][mask] / 2, -1)
    kl = torch.nn.functional.kl_div(ps, pt, log_target=True, reduction="batchmean")
    ce = torch.nn.functional.cross_entropy(s[:, :-1][mask], y[:, 1:][mask])
    assert parts["kd"] == pytest.approx(4 * kl.item(), rel=1e-5)
    assert loss.item() == pytest.approx(4 * kl.item() + 0.3 * ce.item(), rel=1e-5)
    same, p2 = kd_loss(t, t, y, temperature=3.0, alpha=0.0)
    assert abs(p2["kd"]) < 1e-6 and abs(same.item()) < 1e-6


def _compressed_pair(form: str, n_blocks: int = 2):
    """The tiny teacher, a compressed copy as student (rank 4), a snapshot of the student's
    parameters, and ``n_blocks`` KD blocks of 64 tokens."""
    teacher, tok = tiny_mixtral(seed=0)
    student = copy.deepcopy(teacher)
    moecore.compress(student, CompressionConfig(form=form, rank=4))
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    return teacher, tok, student, before, _blocks(tok, None, 64, 1)[:n_blocks]


def test_kd_lowers_loss_training_only_factors(teacher_dir, tmp_path):
    teacher, _, student, before, blocks = _compressed_pair("delta")
    loss0 = eval_kd_loss(student, teacher, blocks, 2.0, 0.0)
    res = distill(str(teacher_dir), student, tmp_path / "out", DistillConfig(
        max_steps=12, lr=2e-2, alpha=0.0, block_size=64, batch_size=4, save_steps=100, logging_steps=1,
        train_core=False))  # the factors only (the default trains the cores too)
    assert res.global_step == 12
    assert res.final_eval_loss < 0.8 * loss0, (loss0, res.final_eval_loss)
    state = json.loads((tmp_path / "out" / "checkpoint-12" / "trainer_state.json").read_text())
    kd = [h["kd_loss"] for h in state["log_history"] if "kd_loss" in h]
    assert len(kd) == 12 and sum(kd[-3:]) < 0.8 * sum(kd[:3]), kd
    after = dict(student.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert changed and all(n.rsplit(".", 1)[-1].startswith(("delta_a_", "delta_b_")) for n in changed), changed
    assert all(not torch.equal(before[n], after[n].detach()) for n in res.checksums)
    # a checkpoint at the last step, complete, and the loss-curve plot
    assert [c.name for c in complete_checkpoints(tmp_path / "out")] == ["checkpoint-12"]
    assert (tmp_path / "out" / "training_curves.png").stat().st_size > 1000


def test_router_only_kd_changes_only_the_routers(teacher_dir, tmp_path):
    """``train_factors=False, train_router=True``: router-only KD (arXiv 2603.02217). Only the
    routers move, and the KD loss falls; with neither factors nor routers there is nothing to train."""
    teacher, _, student, before, blocks = _compressed_pair("basis")
    loss0 = eval_kd_loss(student, teacher, blocks, 1.0, 0.0)
    res = distill(str(teacher_dir), student, tmp_path / "out", DistillConfig(
        max_steps=10, lr=2e-2, alpha=0.0, block_size=64, batch_size=4, save_steps=100, logging_steps=1,
        train_factors=False, train_router=True))
    changed = {n for n, p in student.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed and all(n.endswith("mlp.gate.weight") for n in changed), changed
    assert res.final_eval_loss < loss0, (loss0, res.final_eval_loss)
    with pytest.raises(ConfigError, match="nothing to train"):
        distill(str(teacher_dir), copy.deepcopy(student), tmp_path / "none", DistillConfig(
            max_steps=1, block_size=64, batch_size=2, train_factors=False))


def test_experts_output_loss_is_logged_and_falls(teacher_dir, tmp_path):
    """``experts_loss_weight``: KD on the MoE blocks' outputs as well as the logits. The logged
    term is the mean over layers of each experts module's relative squared error against the
    teacher's (checked against a direct computation at the start) and it falls with training."""
    from moecore.families import find_experts
    from moecore.training.kd import block_loss

    teacher, _, student, _, blocks = _compressed_pair("ragged", n_blocks=4)
    outs = {}
    for name, model in (("s", student), ("t", teacher)):
        outs[name] = {}
        hooks = [m.register_forward_hook(lambda mod, a, o, p=p, d=outs[name]: d.__setitem__(p, o))
                 for p, m, _ in find_experts(model, "all")]
        with torch.no_grad():
            model(blocks[:4])
        for h in hooks:
            h.remove()
    direct = sum(((outs["s"][p] - outs["t"][p]).pow(2).sum() / outs["t"][p].pow(2).sum()).item()
                 for p in outs["t"]) / len(outs["t"])
    assert block_loss(outs["s"], outs["t"]).item() == pytest.approx(direct, rel=1e-5) and direct > 1e-3
    distill(str(teacher_dir), student, tmp_path / "out", DistillConfig(
        max_steps=10, lr=2e-2, alpha=0.0, block_size=64, batch_size=4, save_steps=100, logging_steps=1,
        experts_loss_weight=1.0, train_core=False))  # this large step size is for the factors alone
    state = json.loads((tmp_path / "out" / "checkpoint-10" / "trainer_state.json").read_text())
    block = [h["block_loss"] for h in state["log_history"] if "block_loss" in h]
    assert len(block) == 10 and sum(block[-3:]) < 0.9 * sum(block[:3]), block


def test_resume_after_sigkill(teacher_dir, tmp_path):
    """Start a real run, SIGKILL it after its first checkpoint, resume it to the end, then load it."""
    out = tmp_path / "run"
    args = ["distill", "--teacher", str(teacher_dir), "-o", str(out), "--rank", "4", "--max-steps", "30",
            "--save-steps", "4", "--logging-steps", "1", "--block-size", "64", "--batch-size", "4", "--lr", "1e-2"]
    proc = subprocess.Popen(python_cmd(*args), env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not complete_checkpoints(out) and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = complete_checkpoints(out)
    assert first and not (out / "final").exists()
    killed_at = int(first[-1].name.split("-")[1])
    assert killed_at < 30
    r = subprocess.run(python_cmd(*args, "--resume"), env=subprocess_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((out / "distill_summary.json").read_text())
    assert summary["global_step"] == 30
    assert DistillConfig.load(out) == DistillConfig(max_steps=30, save_steps=4, logging_steps=1, block_size=64,
                                                    batch_size=4, lr=1e-2)
    assert summary["config"] == DistillConfig.load(out).to_dict()
    assert summary["resumed_from"] == str(out / f"checkpoint-{killed_at}")
    state = json.loads((out / "checkpoint-30" / "trainer_state.json").read_text())
    steps = [h["step"] for h in state["log_history"] if "loss" in h]
    assert steps[0] == 1 and steps[-1] == 30  # history from before the kill was restored
    assert all(is_complete(c) for c in complete_checkpoints(out))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert type(model.model.layers[0].mlp.experts).__name__ == "CompressedExperts"
    params = dict(model.named_parameters())
    for name, value in summary["checksums"].items():
        assert params[name].double().sum().item() == pytest.approx(value, rel=1e-6, abs=1e-6)
    # resuming the finished run does nothing and says so: final/ is written once
    stamp = {p.name: p.stat().st_mtime_ns for p in (out / "final").iterdir()}
    r = subprocess.run(python_cmd(*args, "--resume"), env=subprocess_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"{out} already finished at step 30" in r.stdout and "nothing to do" in r.stdout
    assert {p.name: p.stat().st_mtime_ns for p in (out / "final").iterdir()} == stamp
    assert json.loads((out / "distill_summary.json").read_text())["global_step"] == 30
    # asking it for more steps says how to continue instead of training past max_steps
    more = [a if a != "30" else "40" for a in args]
    r = subprocess.run(python_cmd(*more, "--resume"), env=subprocess_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and "is a finished run (30 steps, final/ written)" in r.stderr.strip().splitlines()[-1]
    assert {p.name: p.stat().st_mtime_ns for p in (out / "final").iterdir()} == stamp


def test_ragged_student_trains_padded_with_the_values_of_the_gather(teacher_dir, tmp_path, monkeypatch):
    """A ragged student trains as the delta form on factors padded to the largest expert rank
    (``TrainingForms``: no gather per step). Its trained factors, cores and checkpoints are
    bit-identical to training the compact factors through the gather, the student passed in
    holds its ragged modules again afterwards, and the checksums name the stored tensors."""
    from moecore.families import find_experts
    from moecore.forms.ragged import RaggedForm
    from moecore.training.common import TrainingForms

    teacher, _, student, _, _ = _compressed_pair("ragged")
    ranks = [m.ragged_r_gate.tolist() for _, m, _ in find_experts(student, "all")]
    assert any(len(set(r)) > 1 for r in ranks), ranks  # ranks differ within a projection: padding happens
    shapes = {n: p.shape for n, p in find_experts(student, "all")[0][1].named_parameters()}
    forms = TrainingForms(student)
    assert len(forms.swaps) == len(ranks)
    assert {m.form for _, m, _ in find_experts(student, "all")} == {"delta"}
    first = forms.swaps[0][1]
    assert all(p.numel() == 0 for _, p in first.named_parameters())  # no second copy while training
    with forms.stored() as model:
        assert {n: p.shape for n, p in first.named_parameters()} == shapes
        assert {m.form for _, m, _ in find_experts(model, "all")} == {"ragged"}
    assert {m.form for _, m, _ in find_experts(student, "all")} == {"delta"}
    forms.restore()
    forms.restore()  # idempotent
    assert {m.form for _, m, _ in find_experts(student, "all")} == {"ragged"}

    cfg = DistillConfig(max_steps=6, lr=1e-2, alpha=0.1, block_size=64, batch_size=2, save_steps=3,
                        logging_steps=1)  # the default trains the cores too
    twin = copy.deepcopy(student)
    padded = distill(str(teacher_dir), student, tmp_path / "padded", cfg)
    monkeypatch.setattr(RaggedForm, "training_form", "")  # train the compact factors through the gather
    gather = distill(str(teacher_dir), twin, tmp_path / "gather", cfg)
    assert {m.form for _, m, _ in find_experts(student, "all")} == {"ragged"}
    assert padded.checksums == gather.checksums and padded.global_step == 6
    assert any(".ragged_a_" in n for n in padded.checksums) and not any(".delta_" in n for n in padded.checksums)
    a, b = dict(student.named_parameters()), dict(twin.named_parameters())
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    from safetensors.torch import load_file

    for ck in ("checkpoint-3", "final"):
        x, y = load_file(tmp_path / "padded" / ck / "model.safetensors"), load_file(tmp_path / "gather" / ck / "model.safetensors")
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), ck
