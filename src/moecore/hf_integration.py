"""moecore as a transformers quantization method: a thin adapter over
:mod:`moecore.checkpoint_format`.

Importing this module registers :class:`MoecoreQuantizationConfig` and
:class:`MoecoreHfQuantizer` under ``quant_method = "moecore"`` through transformers' public
``register_quantization_config`` / ``register_quantizer`` (once: a second import, or a reload,
changes nothing); after ``import moecore``, :mod:`moecore.hf_hook` imports it as soon as
transformers loads its quantizers.  ``from_pretrained`` then builds the model on the meta
device, :meth:`MoecoreHfQuantizer._process_model_before_weight_loading` swaps every listed
experts module for an empty :class:`~moecore.compressed_experts.CompressedExperts` of the
recorded ranks (:func:`~moecore.checkpoint_format.swap_in_compressed`), and the stored tensors
load into it as they are: no original weights are needed.
"""
from __future__ import annotations

import copy
from typing import Any

from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .checkpoint_format import (QUANT_METHOD, attach_compression_config, build_quantization_config,
                                check_stored_headers, ignore_guards, swap_in_compressed)
from .errors import CheckpointError
from .families import find_experts
from .forms import CHECKPOINT_FORM, FORMS, PROJECTIONS


class MoecoreQuantizationConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a moecore checkpoint.

    Args:
        form: default form of every layer (a registered form, :data:`moecore.forms.FORMS`).
        layers: ``{module_path: {"gate": r, "up": r, "down": r[, "form": .., "layout": {..}, "report": {..}]}}``
            (``report``: the reconstruction errors measured by ``compress``).
        layout: default :class:`~moecore.families.ExpertsLayout` as a dict.
        moecore_version: version that wrote the checkpoint.
    """

    def __init__(self, form: str = CHECKPOINT_FORM, layers: dict | None = None, layout: dict | None = None,
                 moecore_version: str | None = None, **kwargs: Any) -> None:
        self.quant_method = QUANT_METHOD
        self.form = form
        self.layers = dict(layers or {})
        self.layout = dict(layout or {})
        self.moecore_version = moecore_version
        for key, value in kwargs.items():  # forward compatible: keep unknown keys
            if key != "quant_method":
                setattr(self, key, value)
        self.post_init()

    def post_init(self) -> None:
        """Validate the structure (CheckpointError with the offending entry)."""
        if not isinstance(self.form, str) or self.form not in FORMS:
            raise CheckpointError(f"moecore quantization_config: form must be one of "
                                  f"{', '.join(map(repr, FORMS))}, got {self.form!r}")
        if not isinstance(self.layers, dict) or not self.layers:
            raise CheckpointError("moecore quantization_config lists no compressed layers")
        for path, spec in self.layers.items():
            if not isinstance(spec, dict) or not all(
                    isinstance(spec.get(p), int) and spec[p] > 0 for p in PROJECTIONS):
                raise CheckpointError(f"moecore quantization_config: bad ranks for {path}: {spec!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (what ``config.json`` stores)."""
        return copy.deepcopy(self.__dict__)


class MoecoreHfQuantizer(HfQuantizer):
    """Loads moecore checkpoints: swaps experts modules for ``CompressedExperts`` on the meta
    model before the weights load.  Trainable (the factors are ordinary parameters),
    serializable, no calibration needed."""
    requires_calibration = False
    quantization_config: MoecoreQuantizationConfig

    def __init__(self, quantization_config: MoecoreQuantizationConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to check: moecore modules are plain PyTorch."""
        return None

    def _process_model_before_weight_loading(self, model, dtype=None, checkpoint_files=None, **kwargs: Any):
        swapped = swap_in_compressed(model, self.quantization_config.to_dict(), dtype=dtype)
        check_stored_headers(model, checkpoint_files, swapped)  # unlisted layers, changed rank / bits / group
        ignore_guards(model, swapped)
        for path in swapped:
            # transformers then runs the family's _init_weights on every module, and some read the
            # fused tensors through the MoE block (Qwen3-Omni: block.experts.gate_up_proj); a block
            # with no tensors of its own has nothing to initialize (its children still are visited)
            block = model.get_submodule(path.rpartition(".")[0])
            if next(block.parameters(recurse=False), None) is None and next(block.buffers(recurse=False), None) is None:
                block._is_hf_initialized = True
        return model

    def _process_model_after_weight_loading(self, model, **kwargs: Any):
        for name, module, _ in find_experts(model, "compressed", required=False):
            for pname, p in [*module.named_parameters(), *module.named_buffers()]:  # buffers: moecore.quant
                # loaded tensors carry transformers' `_is_hf_initialized` flag; a missing one
                # would otherwise be left uninitialised with only a warning
                if p.device.type == "meta" or not getattr(p, "_is_hf_initialized", False):
                    raise CheckpointError(f"checkpoint has no tensor for {name}.{pname}")
            try:
                module.check_stored(name)  # dtypes, packed shapes, finite values
            except ValueError as exc:
                raise CheckpointError(f"corrupt compressed checkpoint: {exc}") from exc
        attach_compression_config(model)
        return model

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True

    @property
    def is_compileable(self) -> bool:
        return True

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True


def mark_compressed(model) -> MoecoreQuantizationConfig:
    """Make a compressed model save like any transformers-quantized one: set
    ``model.config.quantization_config`` (ranks, forms and layouts of every
    ``CompressedExperts``) and ``model.hf_quantizer``, so a plain ``model.save_pretrained(dir)``
    writes a folder that ``from_pretrained(dir)`` rebuilds bit-identically.  Called by
    :func:`moecore.compress` and :func:`moecore.save_compressed`.  Returns the config."""
    qc = MoecoreQuantizationConfig.from_dict(build_quantization_config(model))
    model.config.quantization_config = qc
    model.hf_quantizer = MoecoreHfQuantizer(qc, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
    for module in model.modules():  # what transformers' quantizers mark on every (sub)model's config; by class
        if any(c.__name__ == "PreTrainedModel" for c in type(module).__mro__):  # name: this module loads inside
            module.config._is_quantized = True  # transformers' own import of its quantizers (moecore.hf_hook)
    return qc


def register() -> None:
    """Register moecore with transformers through its public decorators, once (idempotent:
    the decorators refuse a second registration of the name)."""
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantization_config(QUANT_METHOD)(MoecoreQuantizationConfig)
        register_quantizer(QUANT_METHOD)(MoecoreHfQuantizer)


register()
