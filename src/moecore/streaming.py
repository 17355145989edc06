"""``compress_checkpoint(MODEL_DIR, OUT, cfg)``: the layer engine streamed from and to
sharded safetensors, for models that don't fit in memory.

* The model skeleton is built from ``config.json`` with empty (meta) weights.
* Each decoder layer's tensors are read from the shards through transformers' own loading
  and key conversion (``convert_and_load_state_dict_in_model`` with the model's conversion
  mapping), so every family that ``from_pretrained`` loads also streams, including legacy
  per-expert key layouts.  Apart from the embeddings and the head, at most one decoder layer
  of original weights is in memory.
* Each finished layer is written as its own shard into ``.OUT.partial/`` (atomically), with
  the calibration activations it produced and a state file.  ``resume=True`` continues
  after a kill from the first unfinished layer; a fingerprint of the model, the config, the
  calibration tokens, the dtype, the device type and the moecore version stops a resume into
  a different job.  Only at the end are ``config.json`` and the index written and the folder
  published as ``OUT`` (see :mod:`moecore.io_utils`): nothing half-written looks complete.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import convert_and_load_state_dict_in_model
from transformers.modeling_utils import LoadStateDictConfig
from transformers.utils import logging as hf_logging
from transformers.utils.hub import convert_file_size_to_int

from .config import CompressionConfig
from .engine import Engine
from .errors import CheckpointError, UnsupportedModelError
from .families import is_compressed
from .hf_integration import MoecoreQuantizationConfig, build_quantization_config, load_guards, swap_in_compressed
from .io_utils import _umask, atomic_write_text
from .model_card import write_model_card
from .resume import STATE, Fingerprint, write_state
from .stats import STATS_FILENAME, statistics, write_statistics_yaml
from .version import __version__

INDEX = "model.safetensors.index.json"


# ---------------------------------------------------------------------------- reading
def _weight_files(model_dir: Path) -> dict[str, Path]:
    """Checkpoint key -> shard file, from ``model.safetensors.index.json`` or the single file."""

    idx = model_dir / INDEX
    if idx.is_file():
        try:
            wm = json.loads(idx.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{idx} is not a valid safetensors index: {exc}") from exc
        if not isinstance(wm, dict) or not all(isinstance(f, str) for f in wm.values()):
            raise CheckpointError(f"{idx} is not a valid safetensors index: its weight_map must map "
                                  "tensor names to shard file names")
        files = {}
        for k, f in wm.items():
            # checked by name, not by resolving: a hub cache's shards are links into its blobs/
            if Path(f).is_absolute() or ".." in Path(f).parts or not f.strip():
                raise CheckpointError(f"{idx} names the shard {f!r} for {k}, outside the model folder")
            files[k] = model_dir / f
        for f in sorted(set(files.values())):
            if not f.is_file():
                raise CheckpointError(f"{idx} names {f.name}, which is missing")
        return files
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise CheckpointError(f"no safetensors weights in {model_dir} (model.safetensors or {INDEX})")
    try:
        with safe_open(str(single), "pt") as fh:
            return {k: single for k in fh.keys()}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"corrupt safetensors file {single}: {str(exc).splitlines()[0]}") from exc


class CheckpointReader:
    """Loads submodules of ``skeleton`` from ``model_dir``'s safetensors shards, a group of
    checkpoint keys at a time, through transformers' own conversion of checkpoint keys."""

    def __init__(self, model_dir: Path, skeleton: nn.Module, dtype: torch.dtype, stack_leaf: str):
        self.dir, self.skeleton, self.dtype = model_dir, skeleton, dtype
        self.files = _weight_files(model_dir)
        self.mapping = get_model_conversion_mapping(skeleton, None, None)
        pat = re.compile(rf"(?:^|\.){re.escape(stack_leaf)}\.(\d+)\.")
        self.by_layer: dict[int | None, list[str]] = {}
        for key in self.files:
            m = pat.search(key)
            self.by_layer.setdefault(int(m.group(1)) if m else None, []).append(key)

    def load(self, keys: list[str], prefix: str, device, exclude: str | None = None) -> None:
        """Read checkpoint ``keys`` into the skeleton; every parameter under ``prefix`` (but not
        under ``exclude``) must be covered (``CheckpointError`` naming the first missing one),
        and those parameters move to ``device``."""

        handles, state = [], {}
        try:
            for f in sorted({self.files[k] for k in keys}):
                try:
                    fh = safe_open(str(f), framework="pt")
                except (SafetensorError, OSError) as exc:
                    raise CheckpointError(f"corrupt safetensors file {f}: {str(exc).splitlines()[0]}") from exc
                handles.append(fh)
                mine = set(fh.keys())
                state.update({k: fh.get_slice(k) for k in keys if self.files[k] == f and k in mine})
            missing_keys = [k for k in keys if k not in state]
            if missing_keys:
                raise CheckpointError(f"{self.dir}: the index lists {missing_keys[0]} but its shard does not hold it")
            cfg = LoadStateDictConfig(dtype=self.dtype, dtype_plan=self.skeleton._get_dtype_plan(self.dtype),
                                      weight_mapping=self.mapping)
            progress = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()
            try:
                info, _ = convert_and_load_state_dict_in_model(self.skeleton, state, cfg)
            except (SafetensorError, RuntimeError, ValueError) as exc:
                raise CheckpointError(f"{self.dir}: cannot read {prefix or 'the non-layer tensors'}: "
                                      f"{str(exc).splitlines()[0]}") from exc
            finally:
                if progress:
                    hf_logging.enable_progress_bar()
        finally:
            handles.clear()  # safe_open handles close when collected
        bad = sorted(set(info.mismatched_keys) | set(info.conversion_errors))
        if bad:
            raise CheckpointError(f"{self.dir}: tensor {sorted(bad)[0]} is missing pieces or has the wrong shape "
                                  f"in the checkpoint")
        if prefix == "" and getattr(self.skeleton.config, "tie_word_embeddings", False):
            self.skeleton.tie_weights()
        root = self.skeleton.get_submodule(prefix) if prefix else self.skeleton
        for name, p in list(root.named_parameters(prefix=prefix)) + list(root.named_buffers(prefix=prefix)):
            if exclude and name.startswith(exclude + "."):
                continue
            if p.device.type == "meta":
                raise CheckpointError(f"{self.dir}: the checkpoint has no tensor for {name} "
                                      f"(weights missing; is config.json from another model?)")
        if device is not None:
            move_except(root, device, exclude)


def move_except(root: nn.Module, device, exclude: str | None) -> None:
    """Move every parameter and buffer of ``root`` to ``device``, except those under ``exclude``."""
    for name, t in list(root.named_parameters()) + list(root.named_buffers()):
        if exclude and name.startswith(exclude + "."):
            continue
        owner, _, leaf = name.rpartition(".")
        mod = root.get_submodule(owner) if owner else root
        if leaf in mod._parameters:
            mod._parameters[leaf].data = t.data.to(device)
        else:
            mod._buffers[leaf] = t.to(device)


def open_skeleton(model_dir: Path, dtype: torch.dtype | str | None):
    """``(config, skeleton, dtype)``: the model built from ``config.json`` with meta
    parameters (buffers are real: rotary tables and the like are computed as usual)."""

    try:
        cfg = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"cannot read {model_dir / 'config.json'}: {str(exc).splitlines()[0]}") from exc
    qc = getattr(cfg, "quantization_config", None)
    if qc:
        method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", "?")
        if method == "moecore":
            raise UnsupportedModelError(f"{model_dir} is already compressed by moecore; pass the original model")
        raise UnsupportedModelError(
            f"{model_dir} stores its weights quantized ({method}); moecore needs the unquantized weights: "
            f"dequantize it first (e.g. load it with transformers in bfloat16 and save_pretrained a copy)")
    if dtype in (None, "auto"):
        dtype = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.eval()
    return cfg, model, dtype


# ---------------------------------------------------------------------------- writing / state
def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors file written to a temporary name, fsynced and renamed: whole or absent."""

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates 0600; outputs follow the umask
    os.replace(tmp, path)


def _write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def fingerprint(model_dir: Path, cfg: CompressionConfig, seqs, dtype, device) -> Fingerprint:
    """sha256 over what decides the output: config.json, the weight files (names, sizes,
    headers), the compression config, the calibration token ids, dtype, device type and the
    moecore version; the :class:`~moecore.resume.Fingerprint` also carries each component
    (a digest, or the value itself), so a refused resume can name what differs."""

    h = hashlib.sha256()
    parts: dict[str, Any] = {}

    def part(name: str, *chunks: bytes) -> None:
        one = hashlib.sha256()
        for c in chunks:
            h.update(c)
            one.update(c)
        parts[name] = one.hexdigest()[:16]

    part("model_config", (model_dir / "config.json").read_bytes())
    weights = []
    for f in sorted(set(_weight_files(model_dir).values())):
        weights += [f.name.encode(), str(f.stat().st_size).encode()]
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            weights.append(fh.read(min(n, 1 << 24)))
    part("weights", *weights)
    cfg_text = json.dumps(cfg.to_dict(), sort_keys=True, default=str)
    part("compression_config", cfg_text.encode())
    parts["compression_config"] = json.loads(cfg_text)
    part("calibration", *[s.numpy().tobytes() for s in seqs or []])
    dev = torch.device(device).type
    h.update(f"{dtype}|{dev}|{__version__}".encode())
    parts.update(dtype=str(dtype), device=dev, version=__version__)
    return Fingerprint(h.hexdigest(), parts)


class StreamingStore:
    """:class:`~moecore.engine.LayerStore` that reads each layer from the checkpoint, writes
    each compressed layer as one shard of the work folder, and frees it."""

    def __init__(self, reader: CheckpointReader, work: Path, stack_path: str, num_layers: int, device,
                 state: dict[str, Any]):
        self.reader, self.work, self.stack_path, self.device, self.state = reader, work, stack_path, device, state
        self.num_shards = num_layers + 1
        if state.get("num_layers") != num_layers:  # for the line an interrupted run prints
            state["num_layers"] = num_layers
            write_state(work, state)

    def load(self, index: int, layer: nn.Module) -> None:
        self.reader.load(self.reader.by_layer.get(index, []), f"{self.stack_path}.{index}", self.device)

    def release(self, index: int, layer: nn.Module) -> None:
        layer.to("meta")

    def done(self, index: int, layer: nn.Module, hidden) -> None:
        prefix = f"{self.stack_path}.{index}."
        _save({prefix + k: v for k, v in layer.state_dict().items()}, self.work / shard_name(index, self.num_shards))

        if is_compressed(layer, recurse=True):
            # through JSON now, so a resumed run (which reads the state back) sees the same values in the same order
            q = json.loads(json.dumps(build_quantization_config(layer), sort_keys=True))
            self.state.setdefault("layers", {}).update({prefix + k: v for k, v in q["layers"].items()})
            self.state.setdefault("qconfig", {k: v for k, v in q.items() if k != "layers"})
        acts = None
        if hidden is not None:
            acts = f"activations-{index:05d}.safetensors"
            _save({f"batch.{b}": h for b, h in enumerate(hidden)}, self.work / acts)
        old = self.state.get("activations")
        self.state.update(done=index + 1, activations=acts)
        write_state(self.work, self.state)  # the commit point of this layer
        if old and old != acts:
            (self.work / old).unlink(missing_ok=True)
        layer.to("meta")


def load_activations(work: Path, state: dict[str, Any]) -> list[torch.Tensor]:
    """The calibration activations the last finished layer produced (the next layer's inputs)."""

    t = load_file(str(work / state["activations"]))
    return [t[f"batch.{b}"] for b in range(len(t))]


def _index(work: Path) -> dict[str, Any]:
    weight_map, total = {}, 0
    for f in sorted(work.glob("model-*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                weight_map[k] = f.name
                sl = fh.get_slice(k)
                n = 1
                for d in sl.get_shape():
                    n *= d
                total += n * torch.empty(0, dtype=getattr(torch, _ST_DTYPES[sl.get_dtype()])).element_size()
    return {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}


_ST_DTYPES = {"F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _consolidate(work: Path) -> None:
    """Merge the per-layer shards into one ``model.safetensors`` (a small model, like
    ``save_pretrained`` below its shard size)."""

    shards = sorted(work.glob("model-*.safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    for f in shards:
        tensors.update(load_file(str(f)))
    _save(tensors, work / "model.safetensors")
    for f in shards:
        f.unlink()


def finish(work: Path, src: Path, model: nn.Module, hf_cfg, stack_path: str, state: dict[str, Any],
           config: CompressionConfig, tokenizer, max_shard_size: int | str = "5GB") -> None:
    """Write what makes ``work`` a checkpoint: the non-layer shard, ``config.json`` with the
    ``quantization_config``, the index (or, when everything fits ``max_shard_size``, one
    ``model.safetensors`` as ``save_pretrained`` writes it), statistics, the model card,
    the compression config, the tokenizer; then drop the resume files.  Everything is derived from the stored
    state, so a resumed run writes the same bytes as an uninterrupted one."""



    n_layers = len(model.get_submodule(stack_path))
    rest, seen = {}, set()
    for k, v in model.state_dict(keep_vars=True).items():
        if k.startswith(stack_path + ".") or id(v) in seen:
            continue  # layers are in their shards; tied duplicates (lm_head = embeddings) once
        seen.add(id(v))
        rest[k] = v
    qdict = {**state["qconfig"], "moecore_version": __version__, "layers": state["layers"]}
    dtype = next(iter(rest.values())).dtype
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype)
    swap_in_compressed(meta, qdict, dtype=dtype)
    _save({**rest, **load_guards(meta)}, work / shard_name(n_layers, n_layers + 1))  # guards: hf_integration
    stats = statistics(meta)
    write_statistics_yaml(stats, work / STATS_FILENAME)
    write_model_card(work, stats, source=str(src), config=config.to_dict())
    hf_cfg.quantization_config = MoecoreQuantizationConfig.from_dict(qdict)
    hf_cfg.dtype = dtype
    hf_cfg.save_pretrained(work)
    if (src / "generation_config.json").is_file():
        shutil.copyfile(src / "generation_config.json", work / "generation_config.json")
    if tokenizer is not None:
        tokenizer.save_pretrained(work)
    config.save(work)
    index = _index(work)
    limit = convert_file_size_to_int(max_shard_size) if isinstance(max_shard_size, str) else int(max_shard_size)
    if index["metadata"]["total_size"] <= limit:
        _consolidate(work)
    else:
        _write_json(work / INDEX, index)
    for f in [work / STATE, *work.glob("activations-*.safetensors")]:
        f.unlink(missing_ok=True)
