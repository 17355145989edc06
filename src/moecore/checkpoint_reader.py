"""Reading an original checkpoint one decoder layer at a time: the model skeleton from
``config.json`` with meta weights (:func:`open_skeleton`), and :class:`CheckpointReader`,
which loads one layer's tensors through transformers' own loading and key conversion
(``convert_and_load_state_dict_in_model`` with the model's conversion mapping), so every
family that ``from_pretrained`` loads also streams, including legacy per-expert key layouts.
Used by :mod:`moecore.streaming`."""
from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import convert_and_load_state_dict_in_model
from transformers.modeling_utils import LoadStateDictConfig
from transformers.utils import logging as hf_logging

from .errors import CheckpointError, UnsupportedModelError, first_line
from .expert_source import ExpertSource
from .families import ExpertsLayout
from .surgery import set_tensor

INDEX = "model.safetensors.index.json"


def weight_files(model_dir: Path) -> dict[str, Path]:
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
        raise CheckpointError(f"corrupt safetensors file {single}: {first_line(exc)}") from exc


class CheckpointReader:
    """Loads submodules of ``skeleton`` from ``model_dir``'s safetensors shards, a group of
    checkpoint keys at a time, through transformers' own conversion of checkpoint keys."""

    def __init__(self, model_dir: Path, skeleton: nn.Module, dtype: torch.dtype, stack_leaf: str):
        self.dir, self.skeleton, self.dtype = model_dir, skeleton, dtype
        self.files = weight_files(model_dir)
        self.mapping = get_model_conversion_mapping(skeleton, None, None)
        self._headers: dict[Path, tuple[int, dict]] = {}
        pat = re.compile(rf"(?:^|\.){re.escape(stack_leaf)}\.(\d+)\.")
        self.by_layer: dict[int | None, list[str]] = {}
        for key in self.files:
            m = pat.search(key)
            self.by_layer.setdefault(int(m.group(1)) if m else None, []).append(key)

    def _header(self, f: Path) -> tuple[int, dict]:
        """``(data start, header)`` of the safetensors file ``f`` (read once)."""
        if f not in self._headers:
            try:
                with open(f, "rb") as fh:
                    n = int.from_bytes(fh.read(8), "little")
                    header = json.loads(fh.read(n))
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"corrupt safetensors file {f}: {first_line(exc)}") from exc
            self._headers[f] = (8 + n, header)
        return self._headers[f]

    def digest(self, keys: list[str], chunk: int = 64 << 20) -> str:
        """sha256 over the stored tensors ``keys`` (each name, dtype, shape and data bytes, in
        key order), read from the shard files in ``chunk``-byte pieces.  Called by
        :meth:`load` on the bytes it is about to load (the page cache serves them to the load
        that follows, so the disk is read once), and by a resume to check that the weights of
        its finished layers did not change."""
        h = hashlib.sha256()
        buf = bytearray(chunk)
        for k in sorted(keys):
            f = self.files[k]
            base, header = self._header(f)
            meta = header.get(k)
            if not isinstance(meta, dict):
                raise CheckpointError(f"{self.dir}: the index lists {k} but its shard does not hold it")
            begin, end = (base + o for o in meta["data_offsets"])
            h.update(f"{k}|{meta['dtype']}|{meta['shape']}|".encode())
            with open(f, "rb") as fh:
                fh.seek(begin)
                left = end - begin
                while left:
                    n = fh.readinto(memoryview(buf)[:min(chunk, left)])
                    if not n:
                        raise CheckpointError(f"corrupt safetensors file {f}: {k} ends past the file's end")
                    h.update(memoryview(buf)[:n])
                    left -= n
        return h.hexdigest()

    def _convert(self, state: dict, what: str):
        """transformers' conversion of ``state`` (checkpoint key -> safetensors slice) into the
        skeleton; ``CheckpointError`` for a tensor it cannot place."""
        cfg = LoadStateDictConfig(dtype=self.dtype, dtype_plan=self.skeleton._get_dtype_plan(self.dtype),
                                  weight_mapping=self.mapping)
        progress = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            info, _ = convert_and_load_state_dict_in_model(self.skeleton, state, cfg)
        except (SafetensorError, RuntimeError, ValueError) as exc:
            raise CheckpointError(f"{self.dir}: cannot read {what}: {first_line(exc)}") from exc
        finally:
            if progress:
                hf_logging.enable_progress_bar()
        bad = sorted(set(info.mismatched_keys) | set(info.conversion_errors))
        if bad:
            raise CheckpointError(f"{self.dir}: tensor {sorted(bad)[0]} is missing pieces or has the wrong shape "
                                  f"in the checkpoint")

    def _read(self, keys: dict[str, str], what: str) -> None:
        """Convert the stored tensors ``keys`` (name given to transformers -> stored name) into
        the skeleton, each shard opened once."""
        handles, state = [], {}
        try:
            for f in sorted({self.files[k] for k in keys.values()}):
                try:
                    fh = safe_open(str(f), framework="pt")
                except (SafetensorError, OSError) as exc:
                    raise CheckpointError(f"corrupt safetensors file {f}: {first_line(exc)}") from exc
                handles.append(fh)
                mine = set(fh.keys())
                state.update({k: fh.get_slice(s) for k, s in keys.items() if self.files[s] == f and s in mine})
            missing_keys = [s for k, s in keys.items() if k not in state]
            if missing_keys:
                raise CheckpointError(f"{self.dir}: the index lists {missing_keys[0]} but its shard does not hold it")
            self._convert(state, what)
        finally:
            handles.clear()  # safe_open handles close when collected

    def load(self, keys: list[str], prefix: str, device, exclude: tuple[str, ...] = ()) -> str:
        """Read checkpoint ``keys`` into the skeleton; every parameter under ``prefix`` (but not
        under the submodules ``exclude``, relative to ``prefix``) must be covered
        (``CheckpointError`` naming the first missing one), and those parameters move to
        ``device``.  Returns the :meth:`digest` of ``keys``."""
        digest = self.digest(keys)
        self._read({k: k for k in keys}, prefix or "the non-layer tensors")
        if prefix == "" and getattr(self.skeleton.config, "tie_word_embeddings", False):
            self.skeleton.tie_weights()
        root = self.skeleton.get_submodule(prefix) if prefix else self.skeleton
        for name, p in _tensors(root, exclude):
            if p.device.type == "meta":
                raise CheckpointError(f"{self.dir}: the checkpoint has no tensor for {prefix + '.' if prefix else ''}"
                                      f"{name} (weights missing; is config.json from another model?)")
        if device is not None:
            move_except(root, device, exclude)
        return digest

    def read_experts(self, holder: nn.Module, path: str, keys: dict[int, list[str]], a: int, b: int) -> None:
        """Experts ``a:b`` of the experts module at ``path`` into ``holder`` (a copy of that
        module whose tensors are meta, of ``b - a`` experts), from their per-expert stored
        tensors ``keys[j]``: the stored names renumbered ``a..b-1 -> 0..b-a-1`` and converted by
        transformers with ``holder`` put at ``path`` for the call."""
        renamed = {}
        for j in range(a, b):
            for k in keys[j]:
                m = EXPERT_KEY.search(k)
                renamed[k[:m.start(1)] + str(j - a) + k[m.end(1):]] = k
        parent, _, leaf = path.rpartition(".")
        owner = self.skeleton.get_submodule(parent)
        before = owner._modules[leaf]
        owner._modules[leaf] = holder
        try:
            self._read(renamed, f"experts {a}..{b - 1} of {path}")
        finally:
            owner._modules[leaf] = before
        for name, p in _tensors(holder, ()):
            if p.device.type == "meta":
                raise CheckpointError(f"{self.dir}: the checkpoint has no tensor for {path}.{name} of experts "
                                      f"{a}..{b - 1}")


#: a stored per-expert tensor name (``...experts.7.gate_proj.weight``); group 1 is the expert
EXPERT_KEY = re.compile(r"(?:^|\.)experts\.(\d+)\.")


def expert_keys(keys: list[str], num_experts: int) -> dict[int, list[str]] | None:
    """The stored tensors of each expert, ``{j: [names]}``, when a layer's experts are stored one
    tensor set per expert (``experts.{j}.``, as Qwen3-MoE, Mixtral and DeepSeek checkpoints
    are): every expert ``0..E-1`` present with as many tensors as the others and no other
    ``experts.`` tensor.  ``None`` otherwise (experts stored fused: read the layer whole)."""
    found: dict[int, list[str]] = {}
    for k in keys:
        m = EXPERT_KEY.search(k)
        if m:
            found.setdefault(int(m.group(1)), []).append(k)
        elif re.search(r"(?:^|\.)experts\.", k):
            return None
    if sorted(found) != list(range(num_experts)) or len({len(v) for v in found.values()}) != 1:
        return None
    return found


def read_plan(keys: list[str], module: nn.Module, layout: ExpertsLayout, limit: int,
              ) -> tuple[dict[int, list[str]], int] | None:
    """``(stored tensors per expert, experts per chunk)`` when the experts ``module`` (meta)
    holds more than ``limit`` bytes and its stored tensors ``keys`` are per expert
    (:func:`expert_keys`); ``None``: read it whole with its layer."""
    size = sum(p.numel() * p.element_size() for p in module.parameters())
    per_expert = expert_keys(keys, layout.split(module)["gate"].shape[0])
    if size <= limit or per_expert is None:
        return None
    return per_expert, max(1, limit * len(per_expert) // size)


class CheckpointExperts(ExpertSource):
    """The experts module at ``path`` (meta in the skeleton) read from the checkpoint ``block``
    experts at a time (:meth:`CheckpointReader.read_experts`), onto ``device``."""

    def __init__(self, reader: CheckpointReader, path: str, module: nn.Module, layout: ExpertsLayout,
                 keys: dict[int, list[str]], device, block: int):
        views = layout.split(module)  # meta views, (E, d_out, d_in)
        super().__init__({k: v.shape for k, v in views.items()}, views["gate"].dtype, device, block)
        self.reader, self.path, self.module, self.layout, self.keys = reader, path, module, layout, keys

    def read(self, a: int, b: int) -> dict[str, torch.Tensor]:
        holder = copy.deepcopy(self.module)  # meta: nothing is copied
        for leaf, p in list(holder._parameters.items()):
            holder._parameters[leaf] = nn.Parameter(torch.empty((b - a, *p.shape[1:]), dtype=p.dtype, device="meta"),
                                                    requires_grad=False)
        self.reader.read_experts(holder, self.path, self.keys, a, b)
        return {k: v.to(self.device) for k, v in self.layout.split(holder).items()}


def _tensors(root: nn.Module, exclude: tuple[str, ...]):
    """``(name, tensor)`` of every parameter and buffer of ``root`` not under ``exclude``."""
    for name, t in list(root.named_parameters()) + list(root.named_buffers()):
        if not any(name.startswith(x + ".") for x in exclude):
            yield name, t


def move_except(root: nn.Module, device, exclude: tuple[str, ...] = ()) -> None:
    """Move every parameter and buffer of ``root`` to ``device``, except those under ``exclude``."""
    for name, t in _tensors(root, exclude):
        set_tensor(root, name, t.data.to(device))


def read_config(model_dir: Path):
    """The transformers config of ``model_dir`` (``CheckpointError`` naming the file if unreadable)."""
    try:
        return AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"cannot read {model_dir / 'config.json'}: {first_line(exc)}") from exc


def open_skeleton(model_dir: Path, dtype: torch.dtype | str | None):
    """``(config, skeleton, dtype)``: the model built from ``config.json`` with meta
    parameters (buffers are real: rotary tables and the like are computed as usual)."""

    cfg = read_config(model_dir)
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
