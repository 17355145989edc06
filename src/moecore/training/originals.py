"""Original (uncompressed) experts modules read one layer at a time from a checkpoint's
safetensors with ``safetensors.safe_open``, never the whole original model.

transformers 5 stores many families in their legacy per-expert key layout (e.g. Mixtral's
``block_sparse_moe.experts.<i>.w1.weight``) and fuses them at load time with conversion
rules. Instead of re-implementing each family's rules, we run transformers' own *reverse*
conversion (``revert_weight_conversion``) on index tensors: every element of the module's
fused parameters gets a unique float64 index, the reverse conversion (pure data movement:
split, chunk, unbind, transpose ...) tells where each element lives in the checkpoint, and
the checkpoint values are scattered back. Exact for any family whose conversion only moves
data; a native (already fused) checkpoint is the identity case.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.core_model_loading import revert_weight_conversion

from ..errors import CheckpointError
from ..modeling import check_model_dir


class OriginalExpertsLoader:
    """Builds the original experts module of one layer from ``model_dir``'s safetensors.

    The model skeleton lives on the ``meta`` device (no memory); only the requested
    layer's expert tensors are read from disk.
    """

    def __init__(self, model_dir: str | Path):
        self.dir = check_model_dir(model_dir)
        try:
            cfg = AutoConfig.from_pretrained(self.dir)
        except (OSError, ValueError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"cannot read the model config in {self.dir}: {first}") from exc
        if getattr(cfg, "quantization_config", None):
            raise CheckpointError(f"{self.dir} is a quantized/compressed checkpoint; pass the original model")
        with torch.device("meta"):
            self.skeleton = AutoModelForCausalLM.from_config(cfg)
        self.files = self._index()

    def _index(self) -> dict[str, Path]:
        idx = self.dir / "model.safetensors.index.json"
        if idx.is_file():
            wm = json.loads(idx.read_text(encoding="utf-8"))["weight_map"]
            return {k: self.dir / f for k, f in wm.items()}
        single = self.dir / "model.safetensors"
        if not single.is_file():
            raise CheckpointError(f"no safetensors weights in {self.dir}")
        with safe_open(str(single), "pt") as f:
            return {k: single for k in f.keys()}

    def experts(self, path: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        """The original experts module at ``path`` (e.g. ``model.layers.3.mlp.experts``) on CPU."""
        meta = self.skeleton.get_submodule(path)
        named = [(n, t) for n, t in meta.named_parameters()]
        offsets, total, index_sd = {}, 0, {}
        for n, t in named:
            offsets[n] = (total, t.numel(), t.shape)
            index_sd[f"{path}.{n}"] = torch.arange(total, total + t.numel(), dtype=torch.float64).view(t.shape)
            total += t.numel()
        if total >= 2 ** 53:
            raise CheckpointError(f"layer {path} too large for index mapping")
        ckpt_view = revert_weight_conversion(self.skeleton, index_sd)
        flat = torch.empty(total, dtype=dtype)
        seen = torch.zeros(total, dtype=torch.bool)
        by_file: dict[Path, list[str]] = {}
        for key in ckpt_view:
            if key not in self.files:
                raise CheckpointError(f"{self.dir}: checkpoint has no tensor {key} (needed for {path})")
            by_file.setdefault(self.files[key], []).append(key)
        for file, keys in by_file.items():
            with safe_open(str(file), "pt") as f:
                for key in keys:
                    pos = ckpt_view[key].reshape(-1).long()
                    val = f.get_tensor(key)
                    if val.numel() != pos.numel():
                        raise CheckpointError(f"{key}: shape {tuple(val.shape)} does not match the model")
                    flat[pos] = val.reshape(-1).to(dtype)
                    seen[pos] = True
        if not bool(seen.all()):
            raise CheckpointError(f"{self.dir}: the checkpoint does not cover every element of {path}")
        module = copy.deepcopy(meta).to_empty(device="cpu")
        state = {n: flat[o:o + k].view(shape).clone() for n, (o, k, shape) in offsets.items()}
        module.load_state_dict(state, strict=False)
        return module.to(dtype).eval()
