"""Dense export of a saved compressed checkpoint, streamed (``moecore export``).

:func:`export_checkpoint` turns a moecore checkpoint folder into a standard transformers one
(the experts reconstructed to dense weights, no ``quantization_config``) without loading the
model: the compressed layers are rebuilt on the meta device from the recorded
``quantization_config`` (as ``stats --recompute`` counts them), and then, one decoder layer at
a time, that layer's stored tensors are read from the safetensors files, its compressed
experts are materialized on ``device`` (``CompressedExperts.materialize``), the layer's keys are
renamed to the family's checkpoint format by transformers' own
``revert_weight_conversion`` (what ``save_pretrained`` does: Mixtral's experts become
``block_sparse_moe.experts.{i}.w1/w2/w3``, the format vLLM, SGLang and llama.cpp's converter
read), and the tensors are appended to the output shards.  Peak memory is one layer's dense
experts plus one output shard (``max_shard_size``), whatever the model's size.

The output holds the same tensors under the same names as
:func:`moecore.io.export_dense` of the loaded model (bit-identical on the same device and
dtype; ``tests/test_hf_integration.py``), in one ``model.safetensors`` below
``max_shard_size`` or in shards with a ``model.safetensors.index.json`` above it.  Written
into a temporary folder and published atomically (:func:`moecore.io_utils.atomic_output_dir`).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
from transformers.core_model_loading import revert_weight_conversion
from transformers.utils.hub import convert_file_size_to_int

from .checkpoint_format import LOAD_NOTICE_KEY, layer_number
from .errors import CheckpointError
from .io_utils import atomic_output_dir, umask
from .modeling import load_meta
from .progress import progress_bar

INDEX = "model.safetensors.index.json"
#: copied as they are, when present: generation settings and every tokenizer file transformers writes
SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
              "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja")


class _ShardWriter:
    """Appends tensors to ``folder``'s shards of at most ``limit`` bytes; :meth:`close` names
    them as ``save_pretrained`` does (one ``model.safetensors``, or numbered shards + index)."""

    def __init__(self, folder: Path, limit: int) -> None:
        self.folder, self.limit = folder, limit
        self.pending: dict[str, torch.Tensor] = {}
        self.size, self.total, self.files = 0, 0, []  # files: [(part path, keys)]

    def add(self, key: str, t: torch.Tensor) -> None:
        n = t.numel() * t.element_size()
        if self.pending and self.size + n > self.limit:
            self.flush()
        self.pending[key] = t.detach().to("cpu").contiguous()
        self.size += n
        self.total += n

    def flush(self) -> None:
        if not self.pending:
            return
        part = self.folder / f"part-{len(self.files):05d}.safetensors"
        save_file(self.pending, str(part), metadata={"format": "pt"})
        os.chmod(part, 0o666 & ~umask())  # safetensors creates 0600; outputs follow the umask
        self.files.append((part, sorted(self.pending)))
        self.pending, self.size = {}, 0

    def close(self) -> None:
        self.flush()
        if len(self.files) == 1:
            self.files[0][0].rename(self.folder / "model.safetensors")
            return
        weight_map = {}
        for i, (part, keys) in enumerate(self.files):
            name = f"model-{i + 1:05d}-of-{len(self.files):05d}.safetensors"
            part.rename(self.folder / name)
            weight_map.update(dict.fromkeys(keys, name))
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")


@torch.no_grad()
def export_checkpoint(src: str | os.PathLike, out: str | os.PathLike, *, dtype: torch.dtype | None = None,
                      device: str | torch.device = "cpu", overwrite: bool = False,
                      max_shard_size: str | int = "5GB", progress: bool = True) -> Path:
    """Write the dense transformers checkpoint of the compressed checkpoint ``src`` into ``out``
    (module docstring), one decoder layer at a time.

    Args:
        src: a folder written by :func:`moecore.save_compressed` or ``moecore compress``.
        out: the output folder; an existing one is replaced only with ``overwrite``.
        dtype: dtype of the written tensors (default: the checkpoint's, ``config.json``'s dtype).
        device: where the dense experts are materialized (``"cuda"`` is faster at real scale).
        max_shard_size: largest output file, as ``save_pretrained`` takes it.
    Raises ``CheckpointError`` for a folder that is not a moecore checkpoint, or a corrupt one.
    """
    meta = load_meta(src)
    p, files, hf, stored, swapped = meta.path, meta.files, meta.config, meta.dtype, meta.swapped
    if meta.quantization is None:
        raise CheckpointError(f"{p} has no moecore-compressed experts (its config.json has no "
                              "quantization_config): there is nothing to export")
    with torch.device("meta"):
        dense = AutoModelForCausalLM.from_config(hf, dtype=stored)  # names and conversions of the dense model
    handles = {f: safe_open(str(f), framework="pt") for f in files}
    where = {k: f for f, fh in handles.items() for k in fh.keys()}
    # every stored tensor under a compressed module (matched through the layer's paths: one pass over the keys)
    paths_by_layer: dict[int | None, list[str]] = {}
    for path in swapped:
        paths_by_layer.setdefault(layer_number(path + "."), []).append(path)
    skip = {LOAD_NOTICE_KEY} | {k for k in where
                                if any(k.startswith(q + ".") for q in paths_by_layer.get(layer_number(k), ()))}
    by_layer: dict[int | None, list[str]] = {}  # None: non-layer tensors (embeddings, final norm, head)
    for k in where:
        if k not in skip:
            by_layer.setdefault(layer_number(k), []).append(k)
    for layer in paths_by_layer:
        by_layer.setdefault(layer, [])
    limit = convert_file_size_to_int(max_shard_size) if isinstance(max_shard_size, str) else int(max_shard_size)
    with atomic_output_dir(out, overwrite, inputs=[p]) as tmp:
        writer = _ShardWriter(tmp, limit)
        order = sorted(by_layer, key=lambda n: -1 if n is None else n)
        for layer in progress_bar(order, desc="moecore: exporting", unit="layer", enabled=progress):
            state = {k: handles[where[k]].get_tensor(k) for k in by_layer[layer]}
            for path in paths_by_layer.get(layer, ()):
                state.update(_materialize(path, swapped[path], handles, where, device))
            for k, t in revert_weight_conversion(dense, state).items():
                writer.add(k, t.to(dtype) if dtype is not None and t.is_floating_point() else t)
        writer.close()
        hf.dtype = dtype or stored
        hf.save_pretrained(tmp)
        for name in SIDE_FILES:
            if (p / name).is_file():
                shutil.copyfile(p / name, tmp / name)
    return Path(out)


def _materialize(path: str, meta_mod, handles, where, device) -> dict[str, torch.Tensor]:
    """The dense tensors ``{f"{path}.{name}": tensor}`` of the compressed module at ``path``,
    its stored tensors read from the checkpoint into a real copy of ``meta_mod`` on ``device``."""
    mod = meta_mod.to_empty(device=device)
    for name, t in mod.state_dict(keep_vars=True).items():
        key = f"{path}.{name}"
        if key not in where:
            raise CheckpointError(f"checkpoint has no tensor for {key}")
        t.data.copy_(handles[where[key]].get_tensor(key))
    try:
        mod.check_stored(path)  # dtypes, packed shapes, finite values
    except ValueError as exc:
        raise CheckpointError(f"corrupt compressed checkpoint: {exc}") from exc
    return {f"{path}.{k}": v.to("cpu") for k, v in mod.materialize().items()}
