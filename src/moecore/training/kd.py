"""Logit distillation with the Hugging Face ``Trainer``.

``DistillTrainer`` adds a frozen teacher and the loss

    L = T² · KL(p_teacher^T ‖ p_student^T) + α · CE(student, labels) + β · Σ_l ‖y_l^s − y_l^t‖² / ‖y_l^t‖² / n

(per-token mean over the positions that have a label; the last term, with ``β > 0``, is the
relative squared error of each MoE experts module's output ``y_l``, student against teacher,
averaged over the ``n`` layers: distillation on the block outputs as well as the logits), and
saves every checkpoint in
moecore's compressed format, published by an atomic rename (see ``checkpoints.py``).
The optimizer, scheduler, RNG and trainer state use the Trainer's own files, so
``train(resume_from_checkpoint=...)`` resumes exactly; they are read with
``weights_only=True`` by the Trainer, and the model with safetensors.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import Trainer
from transformers.trainer_callback import ExportableState

from ..errors import ConfigError, TrainingError
from ..families import find_experts, is_compressed
from ..io import save_compressed
from ..io_utils import atomic_write_text, remove_tree
from . import checkpoints as ckpt


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
            temperature: float = 1.0, alpha: float = 0.1, ignore_index: int = -100):
    """``(loss, {"kd": float, "ce": float})`` for causal-LM logits ``(B, L, V)`` and labels ``(B, L)``.

    Position t's logits predict ``labels[t+1]``; positions whose next label is ``ignore_index``
    are dropped from both terms. KD = T² · mean_t KL(teacher_t ‖ student_t), softmax at T.
    """
    s = student_logits[:, :-1].float()  # (B, L-1, V)
    t = teacher_logits[:, :-1].float()
    y = labels[:, 1:]
    mask = y != ignore_index  # (B, L-1)
    s, t, y = s[mask], t[mask], y[mask]  # (N, V), (N, V), (N,)
    log_ps = F.log_softmax(s / temperature, dim=-1)
    log_pt = F.log_softmax(t / temperature, dim=-1)
    kd = (temperature ** 2) * (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean()
    ce = F.cross_entropy(s, y)
    loss = kd + alpha * ce
    return loss, {"kd": kd.detach().item(), "ce": ce.detach().item()}


def block_loss(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over the layers of ``‖y_s − y_t‖² / ‖y_t‖²`` (``{path: (…, H)}`` outputs of the experts modules)."""
    terms = [(student[p].float() - teacher[p].float()).pow(2).sum() / teacher[p].float().pow(2).sum().clamp_min(1e-30)
             for p in teacher]
    return torch.stack(terms).mean()


class _ExpertsOutputs:
    """Forward hooks that keep the output of every experts module of ``model`` (by path)."""

    def __init__(self, model) -> None:
        self.out: dict[str, torch.Tensor] = {}
        self.handles = [m.register_forward_hook(self._keep(path)) for path, m, _ in find_experts(model, "all")]

    def _keep(self, path: str):
        def hook(module, args, output):
            self.out[path] = output[0] if isinstance(output, tuple) else output
        return hook


class DistillTrainer(Trainer):
    """A ``transformers.Trainer`` whose loss distils a frozen ``teacher`` into the model.

    Args (besides the Trainer's): ``teacher`` (a causal LM with the same vocabulary; put in
    eval mode, frozen, and moved to the student's device), ``temperature`` T > 0, ``alpha``
    ≥ 0 (weight of the CE term), ``block_weight`` β ≥ 0, ``stored_view``: a context manager
    factory inside which the model holds its stored modules (e.g.
    :meth:`~moecore.training.common.TrainingForms.stored`), used around every save, so that
    checkpoints are in the stored form whatever form the model trains in.
    """

    def __init__(self, *args, teacher=None, temperature: float = 1.0, alpha: float = 0.1, block_weight: float = 0.0,
                 stored_view=None, **kwargs):
        if teacher is None:
            raise ConfigError("DistillTrainer needs a teacher model")
        if temperature <= 0 or alpha < 0 or block_weight < 0:
            raise ConfigError(f"need temperature > 0, alpha >= 0 and block_weight >= 0, got {temperature}, {alpha}, "
                              f"{block_weight}")
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.teacher.to(self.args.device)
        self.temperature, self.alpha, self.block_weight = float(temperature), float(alpha), float(block_weight)
        self._stored_view = stored_view  # None: the model trains in its stored form
        self._parts: dict[str, list[float]] = {"kd": [], "ce": []}
        self._blocks = None
        if self.block_weight > 0:  # the experts modules' outputs of student and teacher, per forward
            self._blocks = (_ExpertsOutputs(self.model), _ExpertsOutputs(self.teacher))
            self._parts["block"] = []

    # ---- loss ----
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        out = model(**inputs)
        with torch.no_grad():
            t_logits = self.teacher(**inputs).logits
        loss, parts = kd_loss(out.logits, t_logits, labels, self.temperature, self.alpha)
        if self._blocks is not None:
            block = block_loss(self._blocks[0].out, self._blocks[1].out)
            loss = loss + self.block_weight * block
            parts["block"] = block.detach().item()
        if not all(math.isfinite(v) for v in parts.values()):
            last = ckpt.last_checkpoint(self.args.output_dir)
            raise TrainingError(f"non-finite loss ({', '.join(f'{k} {v}' for k, v in parts.items())}) at step "
                                f"{self.state.global_step + 1}; stopping, nothing written as final"
                                + (f" (last good checkpoint: {last})" if last else ""))
        if model.training:
            for k, v in parts.items():
                self._parts[k].append(v)
        return (loss, out) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the mean KD and CE terms since the last log to the Trainer's log line."""
        if "loss" in logs and self._parts["kd"]:
            for k, vals in self._parts.items():
                logs[f"{k}_loss"] = round(sum(vals) / len(vals), 6)
                vals.clear()
        super().log(logs, start_time)

    # ---- saving ----
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """With a ``stored_view``, nothing to load: the checkpoint holds the stored form, and the
        model, built from it by moecore's loader (:func:`~moecore.training.distill.distill`),
        trains in another; FSDP's sharded weights and a plain run load the Trainer's way."""
        if self._stored_view is None or self.is_fsdp_enabled:
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _barrier(self) -> None:
        if self.args.world_size > 1:
            self.accelerator.wait_for_everyone()

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Save the model in moecore's compressed format (plain ``save_pretrained`` for an
        uncompressed student), the tokenizer, and the training arguments as JSON."""
        output_dir = Path(output_dir or self.args.output_dir)
        if not self.args.should_save:
            return
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if is_compressed(model, recurse=True):
            with self._stored_view() if self._stored_view is not None else contextlib.nullcontext():
                save_compressed(model, output_dir, tokenizer=self.processing_class)
        else:
            model.save_pretrained(output_dir, state_dict=state_dict, save_original_format=False)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(output_dir / "training_args.json", self.args.to_json_string())

    def _save_checkpoint(self, model, trial) -> None:
        """Write ``.tmp-checkpoint-N`` completely, then rename it to ``checkpoint-N``."""
        step = self.state.global_step
        run_dir = Path(self._get_output_dir(trial=trial))
        tmp, final = ckpt.staging_dir(run_dir, step), run_dir / f"{ckpt.PREFIX}-{step}"
        if self.args.should_save:
            remove_tree(tmp)
        self._barrier()
        self.store_flos()
        self.save_model(str(tmp), _internal_call=True)
        if self.args.should_save:
            tmp.mkdir(parents=True, exist_ok=True)
        self._barrier()
        if not self.args.save_only_model:
            self._save_optimizer_and_scheduler(str(tmp))
            self._save_scaler(str(tmp))
            self._save_rng_state(str(tmp))
        if self.args.should_save:
            for cb in [c for c in self.callback_handler.callbacks + [self.control] if isinstance(c, ExportableState)]:
                name, state = cb.__class__.__name__, cb.state()
                if isinstance(self.state.stateful_callbacks.get(name), list):
                    self.state.stateful_callbacks[name].append(state)
                else:
                    self.state.stateful_callbacks[name] = state
            self.state.save_to_json(str(tmp / "trainer_state.json"))
        self._barrier()
        if self.args.should_save:
            ckpt.publish(tmp, final)
            ckpt.rotate(run_dir, self.args.save_total_limit)
        self._barrier()
