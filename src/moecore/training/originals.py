"""Original (uncompressed) experts modules read one decoder layer at a time from a
checkpoint's safetensors, never the whole original model.

It is the streaming engine's reader (:class:`moecore.checkpoint_reader.CheckpointReader`: a meta
skeleton built from ``config.json``, each layer's tensors read through transformers' own
checkpoint-key conversion), so every family that streams also recovers.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from ..engine import experts_by_layer
from ..modeling import check_model_dir
from ..checkpoint_reader import CheckpointReader, open_skeleton


class OriginalExpertsLoader:
    """Builds the original experts module of one layer from ``model_dir``'s safetensors.

    The model skeleton (``.skeleton``) lives on the ``meta`` device; only the requested
    layer's tensors are read from disk, and they go back to ``meta`` once the experts
    module is copied out.
    """

    def __init__(self, model_dir: str | Path):
        self.dir = check_model_dir(model_dir)
        # float32: the exact values of any stored float dtype, cast once by experts(dtype=)
        _, self.skeleton, dtype = open_skeleton(self.dir, torch.float32)
        self.stack_path = experts_by_layer(self.skeleton)[0]
        self.reader = CheckpointReader(self.dir, self.skeleton, dtype, self.stack_path.rpartition(".")[2])

    def experts(self, path: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        """The original experts module at ``path`` (e.g. ``model.layers.3.mlp.experts``) on CPU."""
        index = int(path[len(self.stack_path) + 1:].split(".")[0])
        layer_path = f"{self.stack_path}.{index}"
        layer = self.skeleton.get_submodule(layer_path)
        try:
            self.reader.load(self.reader.by_layer.get(index, []), layer_path, "cpu")
            return copy.deepcopy(self.skeleton.get_submodule(path)).to(dtype).eval()
        finally:
            layer.to("meta")
