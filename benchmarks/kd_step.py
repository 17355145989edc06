"""What one KD step costs when a ragged student trains padded (as the delta form) against
through the gather of its compact factors (``moecore distill``, issue 17).

``distill`` swaps each ragged experts module for its training copy
(``moecore.training.common.TrainingForms``): the compact factors padded to the largest expert
rank, trained as the delta form, written back for every save. The trained values are the same
bit for bit (``tests/test_distill.py``); this times the step. Both variants train the same
student (a bundled model compressed with the default form at ``--ratio``, the data-free init,
which does not change the step's cost) with ``DistillTrainer``, the teacher the bundled
original, in one process, alternating ``--rounds`` times. Seconds per step = (time at step
``--steps`` − time at step 2) / (``--steps`` − 2), from the Trainer's step-end callbacks, so
set-up and Adam's first step are excluded; the median over rounds is printed with its ratio.

    python benchmarks/kd_step.py --model tiny-qwen3moe --out benchmarks/results/kd-step-tiny-qwen3moe.json
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback, TrainingArguments

import moecore
from moecore.forms.ragged import RaggedForm
from moecore.modeling import load_model
from moecore.training.common import BlockDataset, TrainingForms, select_trainable
from moecore.training.distill import _blocks
from moecore.training.kd import DistillTrainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import provenance  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


class _Clock(TrainerCallback):
    def __init__(self):
        self.at: dict[int, float] = {}

    def on_step_end(self, args, state, control, **kw):
        self.at[state.global_step] = time.perf_counter()


def seconds_per_step(teacher, student, tok, blocks, variant: str, steps: int, batch: int) -> float:
    """Steady-state seconds per KD step of a fresh copy of ``student`` trained as ``variant``."""
    work = copy.deepcopy(student)
    saved = RaggedForm.training_form
    RaggedForm.training_form = saved if variant == "padded" else ""  # "" = no training form: the gather
    try:
        forms = TrainingForms(work)
    finally:
        RaggedForm.training_form = saved
    select_trainable(work, train_core=True)
    clock = _Clock()
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=batch, learning_rate=5e-4,
                                 save_strategy="no", report_to="none", use_cpu=True, logging_steps=10_000,
                                 dataloader_num_workers=0, disable_tqdm=True, seed=0)
        DistillTrainer(model=work, args=args, train_dataset=BlockDataset(blocks), teacher=teacher, temperature=1.0,
                       alpha=0.1, callbacks=[clock], stored_view=forms.stored).train()
    forms.restore()
    return (clock.at[steps] - clock.at[2]) / (steps - 2)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-qwen3moe", help="a bundled model (models/NAME) or a folder")
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    if a.steps <= 2:
        raise SystemExit("--steps must be above 2")
    src = Path(a.model) if Path(a.model).is_dir() else REPO / "models" / a.model
    teacher, tok = load_model(src)
    student = copy.deepcopy(teacher)
    moecore.compress(student, moecore.CompressionConfig(target_ratio=a.ratio, init="svd", recover_steps=0),
                     progress=False)
    blocks = _blocks(tok, None, a.block_size, a.steps * a.batch_size * a.block_size)
    times: dict[str, list[float]] = {"gather": [], "padded": []}
    for _ in range(a.rounds):
        for variant in times:
            times[variant].append(seconds_per_step(teacher, student, tok, blocks, variant, a.steps, a.batch_size))
    med = {v: statistics.median(t) for v, t in times.items()}
    for v in times:
        print(f"{v:7s} {med[v]:.3f} s/step  (rounds: {', '.join(f'{t:.3f}' for t in times[v])})  "
              f"{med['gather'] / med[v]:.2f}x vs gather", flush=True)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"meta": {"provenance": provenance(vars(a)), "torch_threads": torch.get_num_threads()},
                                     "seconds_per_step": times, "median": med,
                                     "speedup_vs_gather": med["gather"] / med["padded"]}, indent=2, default=str))


if __name__ == "__main__":
    main()
