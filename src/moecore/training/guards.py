"""Checks that stop recovery and distillation before they compute garbage.

- :func:`check_teacher`: before any training, the teacher must have the student's vocabulary
  and MoE shapes, and (when it is a real model) finite logits on a probe batch.
- :func:`check_finite`: a non-finite tensor (teacher output, loss) stops the run with a
  :class:`~moecore.errors.TrainingError`; nothing is written as final.
"""
from __future__ import annotations

import torch

from ..errors import TrainingError
from ..families import FoundExperts, find_experts, text_config


def _vocab(model) -> int | None:
    return getattr(text_config(model.config), "vocab_size", None)


def experts_shape(found: FoundExperts) -> tuple[int, int, int]:
    """``(num_experts, intermediate_size, hidden_size)`` of an experts module found by
    :func:`~moecore.families.find_experts`, compressed or not (works on the meta device)."""
    if found.compressed:
        m = found.module
        return m.num_experts, m.intermediate_size, m.hidden_size
    e, f, h = found.layout.split(found.module)["gate"].shape
    return int(e), int(f), int(h)


def check_teacher(teacher, student, probe: torch.Tensor | None = None, name: str = "the teacher") -> None:
    """``TrainingError`` unless ``teacher`` (a model, possibly on the meta device) matches
    ``student``: same vocabulary size, same experts paths with the same (E, F, H), and —
    given a ``probe`` batch ``(B, L)`` of token ids and real weights — finite logits."""
    tv, sv = _vocab(teacher), _vocab(student)
    if tv != sv:
        raise TrainingError(f"{name} has a vocabulary of {tv} tokens, the student {sv}: not the same model family")
    tf, sf = find_experts(teacher, "all", required=False), find_experts(student, "all", required=False)
    tp, sp = [f.path for f in tf], [f.path for f in sf]
    if tp != sp:
        raise TrainingError(f"{name} has MoE layers {tp[:2]}..., the student {sp[:2]}...: not the same architecture")
    for path, t, s in zip(tp, tf, sf):
        ts, ss = experts_shape(t), experts_shape(s)
        if ts != ss:
            raise TrainingError(f"{name}'s {path} has (experts, intermediate, hidden) = {ts}, the student {ss}")
    if probe is not None and next(teacher.parameters()).device.type != "meta":
        dev = next(teacher.parameters()).device
        was = teacher.training
        teacher.eval()
        with torch.no_grad():
            logits = teacher(input_ids=probe.to(dev)).logits
        teacher.train(was)
        check_finite(logits, f"{name}'s logits on a probe batch (NaN/inf weights?)")


def check_finite(t: torch.Tensor, what: str) -> torch.Tensor:
    """Return ``t``; ``TrainingError`` naming ``what`` if any element is NaN or infinite."""
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise TrainingError(f"{what}: {bad} of {t.numel()} values are NaN or infinite; stopping, nothing written "
                            "as final")
    return t
