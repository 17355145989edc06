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

# Parameter-name markers of the compressed experts (docs/ARCHITECTURE.md).
FACTOR_MARKERS = ("delta_a_", "delta_b_", "wrap_")
CORE_MARKER = "core_"
ROUTER_NAMES = ("gate", "router")


def select_trainable(model, *, train_core: bool = False, train_router: bool = False,
                     train_experts_if_plain: bool = True) -> list[str]:
    """Freeze everything, then unfreeze the compressed factors (``delta_a_*``, ``delta_b_*``,
    ``wrap_*``), optionally the cores (``core_*``) and the routers. A plain (uncompressed)
    student trains its experts' weights instead. Returns the trainable parameter names."""
    paths = [path for path, _, _ in find_experts(model, "all", required=False)]
    compressed = is_compressed(model, recurse=True)
    names = []
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        parent = name.rsplit(".", 1)[0]
        in_experts = parent in paths
        want = False
        if compressed and in_experts:
            want = leaf.startswith(FACTOR_MARKERS) or (train_core and leaf.startswith(CORE_MARKER))
        elif in_experts and train_experts_if_plain:
            want = True
        if train_router and any(parent == e.rsplit(".", 1)[0] + f".{r}" for e in paths for r in ROUTER_NAMES):
            want = True
        p.requires_grad_(want)
        if want:
            names.append(name)
    if not names:
        raise ConfigError("nothing to train: the student has no compressed factors or experts")
    return names


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
