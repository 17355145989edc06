"""Saving compressed models (loadable with ``from_pretrained`` after ``import moecore``) and
exporting dense ones (loadable by stock transformers).  Safetensors only, never pickle.

Both writers go through :func:`moecore.io_utils.atomic_output_dir`: everything is written
into a temporary folder beside ``out_dir``, which then replaces ``out_dir`` atomically; an
existing ``out_dir`` is kept intact until the new one is complete, and ``out_dir`` may never be,
contain or lie inside the folder the model was loaded from (``model.name_or_path``).
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from .errors import CheckpointError, UnsupportedModelError
from .families import find_experts
from .checkpoint_format import load_guards
from .hf_integration import mark_compressed
from .io_utils import atomic_output_dir, model_source
from .model_card import write_model_card
from .stats import STATS_FILENAME, statistics, write_statistics_yaml
from .version import __version__


def _compressed_modules(model) -> dict[str, torch.nn.Module]:
    return {n: m for n, m, _ in find_experts(model, "compressed", required=False)}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_compressed(model, out_dir: str | os.PathLike, tokenizer=None, *, overwrite: bool = False,
                    config=None, max_shard_size: str | int = "5GB", extra_configs: Iterable = (),
                    quality: dict[str, Any] | None = None) -> Path:
    """Save a compressed model so that ``AutoModelForCausalLM.from_pretrained(out_dir)`` (after
    ``import moecore``) rebuilds it bit-identically.

    Writes ``model.safetensors`` (or shards) with the module's own parameter names,
    ``config.json`` with moecore's ``quantization_config``, ``moecore_config.json`` (the
    :class:`~moecore.config.CompressionConfig` + version; ``config`` or
    ``model.moecore_config``), ``compression_statistics.yaml``, the model card ``README.md``
    (how to load it, the source model, statistics, ``quality``) and the tokenizer if given.
    The stored tensors include :func:`~moecore.checkpoint_format.load_guards`, so transformers
    refuses the folder, naming ``import moecore``, when moecore is not imported.

    Args:
        model: a model returned by :func:`moecore.compress` or loaded from a moecore checkpoint.
        out_dir: target folder; an existing one is replaced only with ``overwrite=True``.
        tokenizer: saved alongside when given.
        config: the CompressionConfig to record (default ``model.moecore_config``).
        extra_configs: more configs saved into the folder with it (e.g. the
            :class:`~moecore.config.RecoveryConfig` that produced the model).
        quality: measured quality for the model card (e.g. ``{"heldout_ppl": 44.1}``).
    Returns the output path.
    """
    if not _compressed_modules(model):
        raise UnsupportedModelError("model has no moecore-compressed experts; run moecore.compress first")
    qdict = mark_compressed(model).to_dict()
    stats = statistics(model)
    cfg = config if config is not None else getattr(model, "moecore_config", None)
    with atomic_output_dir(out_dir, overwrite, inputs=[model_source(model)]) as tmp:
        # save_original_format=False: keys are the modules' own names, no conversion regexes
        model.save_pretrained(tmp, save_original_format=False, max_shard_size=max_shard_size)
        _check_saved_keys(tmp, model)
        add_tensors(tmp, load_guards(model))
        # compress() and from_pretrained of a compressed folder record the source; else where it was loaded from
        source = model.moecore_source if hasattr(model, "moecore_source") else model_source(model)
        write_model_card(tmp, stats, source=source, quality=quality,
                         config=cfg.to_dict() if cfg is not None else None)
        if cfg is not None:
            cfg.save(tmp)
        else:
            _write_json(tmp / "moecore_config.json", {"moecore_version": __version__, "form": qdict["form"],
                                                      "note": "compression config unknown (model not made by compress)"})
        write_statistics_yaml(stats, tmp / STATS_FILENAME)
        for extra in extra_configs:
            extra.save(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out_dir)


def add_tensors(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Add a few small ``tensors`` to the checkpoint ``save_pretrained`` wrote into ``folder``:
    to its one ``model.safetensors`` (rewritten: header extended, data copied in chunks, theirs
    appended), or, when sharded, as one more shard named in the index."""
    index_file = folder / "model.safetensors.index.json"
    if index_file.is_file():
        index = json.loads(index_file.read_text(encoding="utf-8"))
        name = "model-moecore-guards.safetensors"
        (folder / name).write_bytes(safetensors_bytes(tensors, metadata={"format": "pt"}))
        index["weight_map"].update({k: name for k in tensors})
        index.setdefault("metadata", {})["total_size"] = (int(index.get("metadata", {}).get("total_size", 0))
                                                          + sum(t.numel() * t.element_size() for t in tensors.values()))
        _write_json(index_file, index)
        return
    path = folder / "model.safetensors"
    extra = safetensors_bytes(tensors)
    n_extra = int.from_bytes(extra[:8], "little")
    new = json.loads(extra[8:8 + n_extra])
    with open(path, "rb") as src:
        n = int.from_bytes(src.read(8), "little")
        header = json.loads(src.read(n))
        size = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        for k, v in new.items():
            if k != "__metadata__":
                header[k] = {**v, "data_offsets": [o + size for o in v["data_offsets"]]}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as dst:
            dst.write(len(blob).to_bytes(8, "little") + blob)
            while chunk := src.read(min(1 << 24, size - (dst.tell() - 8 - len(blob)))):
                dst.write(chunk)
            dst.write(extra[8 + n_extra:])
    os.replace(tmp, path)


def _check_saved_keys(folder: Path, model) -> None:
    """The stored keys must be exactly the model's (unique) state-dict keys."""
    keys: set[str] = set()
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            keys.update(fh.keys())
    for name in _compressed_modules(model):
        missing = [k for k in model.state_dict() if k.startswith(name + ".") and k not in keys]
        if missing:
            raise CheckpointError(f"transformers renamed or dropped compressed tensors while saving: {missing[:3]}")


@torch.no_grad()
def dense_model(model):
    """A new model of the same class whose experts are the original fused modules, with the
    weights reconstructed by ``CompressedExperts.materialize()`` (the input is not modified)."""
    mods = _compressed_modules(model)
    if not mods:
        raise UnsupportedModelError("model has no moecore-compressed experts")
    cfg = copy.deepcopy(model.config)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    dtype = next(iter(mods.values())).float_dtype
    with torch.device("meta"):
        dense = type(model)._from_config(cfg, dtype=dtype)
    state = {}
    for k, v in model.state_dict().items():
        if not any(k.startswith(n + ".") for n in mods):
            state[k] = v
    for name, m in mods.items():
        for k, v in m.materialize().items():
            state[f"{name}.{k}"] = v
    missing, unexpected = dense.load_state_dict(state, strict=False, assign=True)
    tied = set(getattr(dense, "_tied_weights_keys", None) or {})
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise CheckpointError(f"dense export does not match {type(model).__name__}: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    for name, buf in list(dense.named_buffers()):  # non-persistent buffers (rotary tables, ...)
        if buf.device.type == "meta":
            mod_name, _, leaf = name.rpartition(".")
            owner = dense.get_submodule(mod_name) if mod_name else dense
            owner._buffers[leaf] = model.get_buffer(name).clone()
    dense.tie_weights()
    for name, t in list(dense.named_parameters()) + list(dense.named_buffers()):
        if t.device.type == "meta":
            raise CheckpointError(f"dense export left {name} without data")
    dense.eval()
    return dense


def export_dense(model, out_dir: str | os.PathLike, tokenizer=None, *, overwrite: bool = False) -> Path:
    """Write a standard transformers checkpoint (experts reconstructed to dense fused tensors,
    no ``quantization_config``) that stock transformers loads without moecore.

    Logits equal the compressed model's up to float rounding (the dense weights are products
    of the stored factors).  Atomic, safetensors only.  Returns the output path.
    """
    dense = dense_model(model)
    with atomic_output_dir(out_dir, overwrite, inputs=[model_source(model)]) as tmp:
        dense.save_pretrained(tmp)
        cfg = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
        if "quantization_config" in cfg:
            raise CheckpointError("dense export still carries a quantization_config")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out_dir)
