"""Helpers shared by distillation, recovery and async evaluation: model detection,
trainable-parameter selection, packed training blocks, JSONL logs.  Models are loaded with
:func:`moecore.modeling.load_model`, the package's one loader."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..data import TextFile, load_split
from ..errors import ConfigError
from ..families import find_experts, is_compressed

ROUTER_NAMES = ("gate", "router")


def select_trainable(model, *, train_core: bool = False, train_router: bool = False,
                     train_experts_if_plain: bool = True, train_factors: bool = True) -> list[str]:
    """Freeze everything, then unfreeze what each compressed experts module says it trains
    (:meth:`~moecore.compressed_experts.CompressedExperts.trainable_parameters`: its form's
    float factors unless ``train_factors`` is off, optionally its cores) and optionally the
    routers.  A plain (uncompressed) student trains its experts' weights instead
    (``train_experts_if_plain``).  Returns the trainable parameter names."""
    experts = find_experts(model, "all", required=False)
    paths = [path for path, _, _ in experts]
    compressed = any(is_compressed(module) for _, module, _ in experts)
    want: set[int] = set()
    for path, module, _ in experts:
        if is_compressed(module):
            core_names = set(getattr(module, "core_names", ()))
            want.update(id(p) for n, p in module.trainable_parameters(train_core)
                        if train_factors or n in core_names)
        elif train_experts_if_plain and not compressed:  # a partly compressed student trains no plain experts
            want.update(id(p) for p in module.parameters())
    if train_router:
        for path in paths:
            parent = path.rsplit(".", 1)[0]
            for r in ROUTER_NAMES:
                router = _submodule(model, f"{parent}.{r}")
                if router is not None:
                    want.update(id(p) for p in router.parameters(recurse=False))
    names = []
    for name, p in model.named_parameters():
        p.requires_grad_(id(p) in want)
        if id(p) in want:
            names.append(name)
    if not names:
        quantized = [path for path, module, _ in experts if getattr(module, "quantized", None)]
        if quantized:
            raise ConfigError(f"nothing to train: the student stores its factors quantized ({quantized[0]} and "
                              f"{len(quantized) - 1} more layer(s)), and moecore trains float factors only: compress "
                              "the student with --core-bits alone (float factors, trained against the frozen "
                              "quantized core) or without quantization")
        raise ConfigError("nothing to train: the student has no compressed factors or experts")
    return names


def _submodule(model, path: str):
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


class BlockDataset(torch.utils.data.Dataset):
    """Fixed-length causal-LM blocks: ``input_ids`` = ``labels``, full attention mask."""

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict:
        x = self.blocks[i]
        return {"input_ids": x, "labels": x.clone(), "attention_mask": torch.ones_like(x)}


def training_texts(data: str | Path | None):
    """Texts of a user file (streamed: a :class:`moecore.data.TextFile`), or the bundled
    ``train`` split. The held-out split is never read here."""
    return TextFile(data) if data else load_split("train")


def append_jsonl(path: str | Path, row: dict) -> None:
    """Append one JSON line and fsync (a reader sees whole lines; a torn last line is skipped)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a JSONL file; a missing file gives ``[]`` and a torn last line is ignored."""
    p = Path(path)
    if not p.is_file():
        return []
    rows = []
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
