"""Helpers shared by distillation, recovery and async evaluation: model detection,
trainable-parameter selection, packed training blocks, JSONL logs.  Models are loaded with
:func:`moecore.modeling.load_model`, the package's one loader."""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import torch

from ..data import TextFile, load_split
from ..errors import ConfigError
from ..families import find_experts, is_compressed
from ..surgery import replace_module

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


class TrainingForms:
    """Train each compressed experts module of ``model`` in its form's
    :attr:`~moecore.forms.Form.training_form`: a module whose form trains as another (the ragged
    form's compact factors as the delta form's, padded to the largest expert rank, so a step
    runs no gather and no scatter-back) is swapped for its
    :meth:`~moecore.compressed_experts.CompressedExperts.training_copy`, in its own dtype.
    The values trained are those of training the stored factors (the padded columns get zero
    gradients and stay zero). The stored modules' copied tensors are freed while the copies
    train (no second copy of the model's factors). :meth:`stored` puts the stored modules
    back, rebuilt from the copies, for as long as a save takes; :meth:`restore` for good
    (idempotent)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        #: (path, stored module, its training copy, {stored name: copy's name}, {stored name: shape})
        self.swaps: list[tuple[str, torch.nn.Module, torch.nn.Module, dict[str, str], dict[str, torch.Size]]] = []
        for path, module, _ in find_experts(model, "all", required=False):
            form = getattr(module, "form_impl", None) if is_compressed(module) else None
            if form is None or not form.training_form or form.training_form == form.name or module.quant is not None:
                continue
            work, names = module.training_copy(module.stored(module.core_names[0]).dtype)
            work.train(module.training)
            replace_module(model, path, work)
            self.swaps.append((path, module, work, names, {n: module._parameters[n].shape for n in names}))
            self._free(module, names)

    @staticmethod
    def _free(module: torch.nn.Module, names) -> None:
        for n in names:
            p = module._parameters[n]
            p.data = p.data.new_empty(0)

    def stored_names(self, names: list[str]) -> list[str]:
        """Parameter names of the model in training form -> the same tensors' stored names."""
        back = {f"{path}.{w}": f"{path}.{n}" for path, _, _, m, _ in self.swaps for n, w in m.items()}
        return [back.get(n, n) for n in names]

    def _put(self, stored: bool) -> None:
        for path, module, work, names, shapes in self.swaps:
            if stored:  # rebuilt whole from the copy (from_training is exact for untrained factors too)
                for n, shape in shapes.items():
                    p = module._parameters[n]
                    p.data = p.data.new_empty(shape)
                    p.requires_grad_(work._parameters[names[n]].requires_grad)
                module.load_trained(work, names, list(names))
                module.train(work.training)
            else:
                self._free(module, names)
            replace_module(self.model, path, module if stored else work)

    @contextmanager
    def stored(self):
        """The model holds its stored modules, with the trained values, inside this block."""
        self._put(True)
        try:
            yield self.model
        finally:
            self._put(False)

    def restore(self) -> None:
        """The stored modules back for good, with the trained values."""
        self._put(True)
        self.swaps = []


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
