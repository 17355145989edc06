"""``moecore distill`` under ``accelerate launch`` with 2 CPU processes (DDP over gloo): both
processes end with identical weights, and what the run saved equals what it reported."""
from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moecore.training.distill import _blocks, eval_kd_loss

from ._tiny_models import save_tiny, subprocess_env

SCRIPT = "import sys\nfrom moecore.cli import main\nsys.exit(main(sys.argv[1:]))\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_distill(tmp_path):
    teacher = save_tiny(tmp_path / "teacher", seed=5)
    script = tmp_path / "run_moecore.py"
    script.write_text(SCRIPT)
    out = tmp_path / "ddp"
    # `--multi_gpu` picks accelerate's torchrun launcher; with no visible GPU every process runs
    # on CPU and the process group uses gloo (`--cpu` alone would start a single process).
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(script),
           "distill", "--teacher", str(teacher), "-o", str(out), "--rank", "4", "--max-steps", "4",
           "--save-steps", "2", "--logging-steps", "1", "--block-size", "64", "--batch-size", "2",
           "--lr", "1e-2", "--alpha", "0.5", "--temperature", "2.0"]
    env = {**subprocess_env(), "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es)" in r.stdout
    summary = json.loads((out / "distill_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_step"] == 4
    # DDP kept both processes' weights identical
    a, b = summary["rank_checksums"]
    assert a == b
    # the saved student is the one the run reported
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    params = dict(model.named_parameters())
    for name, value in summary["checksums"].items():
        assert params[name].double().sum().item() == pytest.approx(value, rel=1e-9, abs=1e-9)
    t = AutoModelForCausalLM.from_pretrained(teacher)
    blocks = _blocks(AutoTokenizer.from_pretrained(teacher), None, 64, 1)[:2]
    assert eval_kd_loss(model, t, blocks, 2.0, 0.5) == pytest.approx(summary["final_eval_loss"], rel=1e-5)
    # each of 4 steps consumed 2 blocks on each of 2 processes
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and state["train_batch_size"] == 2
    assert torch.isfinite(torch.tensor([h["loss"] for h in state["log_history"] if "loss" in h])).all()
