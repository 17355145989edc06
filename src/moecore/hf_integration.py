"""moecore as a transformers quantization method.

Importing this module registers :class:`MoecoreQuantizationConfig` and
:class:`MoecoreHfQuantizer` under ``quant_method = "moecore"``; after ``import moecore``,
:mod:`moecore.hf_hook` imports it as soon as transformers loads its quantizers.

A compressed checkpoint's ``config.json`` carries::
    "quantization_config": {"quant_method": "moecore", "form": "delta",
                            "layout": {...ExpertsLayout...}, "moecore_version": "...",
                            "layers": {"model.layers.0.mlp.experts": {"gate": 8, "up": 8, "down": 8}, ...}}

(a layer entry may also override ``form`` / ``layout``).  ``from_pretrained`` then builds the
model on the meta device, :meth:`MoecoreHfQuantizer._process_model_before_weight_loading`
swaps every listed experts module for an empty :class:`CompressedExperts` of the recorded
ranks, and the stored tensors load into it as they are: no original weights are needed.

Load guards.  Without ``import moecore`` transformers only warns about the unknown
``quant_method`` and would run the model with randomly initialised experts.  So moecore's
writers add :func:`load_guards` to the stored tensors: a short ``uint8`` tensor under each
compressed layer's original fused key (``...experts.down_proj``), whose shape cannot match the
original ``(E, H, F)`` tensor, so transformers' loading report raises ("ignore_mismatched_sizes"),
and a tensor named :data:`LOAD_NOTICE_KEY`, which the same report lists, saying to ``import
moecore``.  With moecore imported, the quantizer adds their keys to the model's
``_keys_to_ignore_on_load_unexpected``: they load nowhere and nothing else reads them.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import torch
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
)
from transformers.quantizers.base import HfQuantizer, _assign_is_quantized
from transformers.utils.quantization_config import QuantizationConfigMixin

from .config import CONFIG_FILENAME, CompressionConfig
from .errors import CheckpointError, ConfigError, UnsupportedModelError
from .families import ExpertsLayout, find_experts, layout_of
from .forms import DEFAULT_FORM, FORMS, PROJECTIONS
from .model_card import base_model_of
from .quant import build_experts
from .surgery import replace_module
from .version import __version__

QUANT_METHOD = "moecore"
#: the stored tensor whose name transformers' load report shows when moecore is not imported
LOAD_NOTICE_KEY = ("moecore: a moecore-compressed checkpoint; pip install moecore, then `import moecore` "
                   "before from_pretrained")


def load_guards(model) -> dict[str, torch.Tensor]:
    """The tensors that make plain transformers refuse a compressed checkpoint (module
    docstring): :data:`LOAD_NOTICE_KEY`, and for each compressed experts module a ``uint8``
    tensor holding that notice's bytes under the module's original ``down`` key."""
    notice = torch.tensor(list(LOAD_NOTICE_KEY.encode()), dtype=torch.uint8)
    guards = {LOAD_NOTICE_KEY: notice[:7].clone()}  # b"moecore"
    for name, m, _ in find_experts(model, "compressed"):
        guards[f"{name}.{m.layout.down_attr}"] = notice.clone()
    return guards


def _ignore_guards(model, paths: dict[str, Any]) -> None:
    """Let the guards of :func:`load_guards` load nowhere, without a report line."""
    patterns = {re.escape(LOAD_NOTICE_KEY)} | {rf"(^|\.){re.escape(f'{p}.{m.layout.down_attr}')}$"
                                                for p, m in paths.items()}
    model._keys_to_ignore_on_load_unexpected = set(model._keys_to_ignore_on_load_unexpected or ()) | patterns


class MoecoreQuantizationConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a moecore checkpoint.

    Args:
        form: default form of every layer (a registered form, :data:`moecore.forms.FORMS`).
        layers: ``{module_path: {"gate": r, "up": r, "down": r[, "form": .., "layout": {..}, "report": {..}]}}``
            (``report``: the reconstruction errors measured by ``compress``).
        layout: default :class:`~moecore.families.ExpertsLayout` as a dict.
        moecore_version: version that wrote the checkpoint.
    """

    def __init__(self, form: str = DEFAULT_FORM, layers: dict | None = None, layout: dict | None = None,
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

    def _process_model_before_weight_loading(self, model, dtype=None, **kwargs: Any):
        swapped = swap_in_compressed(model, self.quantization_config.to_dict(), dtype=dtype)
        _ignore_guards(model, swapped)
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
        _attach_compression_config(model)
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


def _attach_compression_config(model) -> None:
    """Set ``model.moecore_config`` from the checkpoint's ``moecore_config.json`` (when loading
    from a local folder), so that a re-save (e.g. after distillation) keeps it.  A malformed
    file is a ``CheckpointError`` (the record of how the model was made must not be lost
    silently); the placeholder written for models not made by ``compress`` is skipped."""
    folder = Path(str(getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")))
    model.moecore_source = base_model_of(folder)  # what it was compressed from (its model card), for re-saves
    f = folder / CONFIG_FILENAME
    if not f.is_file():
        return
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
        if isinstance(data, dict) and "note" in data and "rank" not in data and "target_ratio" not in data:
            return  # "compression config unknown" placeholder (save_compressed of a model not made by compress)
        model.moecore_config = CompressionConfig.from_dict(data)
    except (ConfigError, ValueError, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"malformed {f}: {first}") from exc


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
    _assign_is_quantized(model)
    return qc


def swap_in_compressed(model, qconfig: dict[str, Any], dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Replace every experts module listed in ``qconfig["layers"]`` by an uninitialised
    :class:`CompressedExperts` with the recorded form, ranks and layout, on the device of the
    module it replaces (meta during ``from_pretrained``).  Returns ``{path: new module}``.

    Shapes (E, H, F) are read off the module being replaced; a path that is missing or not an
    experts module, or a recorded layout that differs from the detected one, raises
    ``CheckpointError`` naming it.  Every swap goes through :func:`moecore.surgery.replace_module`.
    """
    default_layout = qconfig.get("layout") or {}
    out = {}
    for path, spec in qconfig["layers"].items():
        path = _resolve_path(model, path)
        old = model.get_submodule(path)
        try:
            found = layout_of(path, old)
        except UnsupportedModelError as exc:
            raise CheckpointError(f"cannot rebuild {path}: {exc}") from exc
        recorded = spec.get("layout") or default_layout
        layout = ExpertsLayout.from_dict(recorded) if recorded else found
        if layout.to_dict() != found.to_dict():  # a tampered layout would export wrong dense weights
            raise CheckpointError(f"quantization_config layout of {path} ({layout.name}) does not match the "
                                  f"model's experts layout {found.to_dict()}")
        views = found.split(old)
        e, f, h = views["gate"].shape
        ref = views["gate"]
        new = build_experts(  # CompressedExperts, or its quantized-storage subclass (moecore.quant)
            e, h, f, spec.get("form", qconfig.get("form", DEFAULT_FORM)), {p: spec[p] for p in PROJECTIONS},
            layout, quant=spec.get("quant", qconfig.get("quant")), act_fn=getattr(old, "act_fn", None),
            dtype=dtype or ref.dtype, device=ref.device,
        )
        new.report = dict(spec.get("report") or {})
        replace_module(model, path, new)
        out[path] = new
    return out


def _resolve_path(model, path: str) -> str:
    """``path`` in ``model``, also when loading a checkpoint of the ``*ForCausalLM`` into its
    base model (``AutoModel``: no ``model.`` prefix) or the other way round."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    candidates = [path]
    if prefix and path.startswith(prefix + "."):
        candidates.append(path[len(prefix) + 1:])
    if prefix:
        candidates.append(f"{prefix}.{path}")
    for cand in candidates:
        try:
            model.get_submodule(cand)
            return cand
        except AttributeError:
            continue
    raise CheckpointError(f"quantization_config names {path}, which this {type(model).__name__} does not have")


def build_quantization_config(model) -> dict[str, Any]:
    """The ``quantization_config`` dict of a compressed model (ranks/form/layout of every
    ``CompressedExperts``).  Raises ``UnsupportedModelError`` if nothing is compressed."""
    mods = [(n, m) for n, m, _ in find_experts(model, "compressed")]  # UnsupportedModelError if none
    forms = [m.form for _, m in mods]
    form = max(set(forms), key=forms.count)
    layouts = [m.layout.to_dict() for _, m in mods]
    layout = max(layouts, key=layouts.count)
    layers = {}
    for name, m in mods:
        spec: dict[str, Any] = {p: int(m.ranks[p]) for p in PROJECTIONS}
        if m.report:  # reconstruction errors measured at compress time survive the round trip
            spec["report"] = _jsonable(m.report)
        if m.form != form:
            spec["form"] = m.form
        if m.layout.to_dict() != layout:
            spec["layout"] = m.layout.to_dict()
        if getattr(m, "quant", None) is not None:  # quantized storage: bits, group, method
            spec["quant"] = dataclasses.asdict(m.quant)
        layers[name] = spec
    return {"quant_method": QUANT_METHOD, "form": form, "layout": layout, "moecore_version": __version__,
            "layers": layers}


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.item() if obj.numel() == 1 else obj.tolist()
    return obj


def register() -> None:
    """Register moecore in transformers' auto quantization mappings (idempotent)."""
    AUTO_QUANTIZATION_CONFIG_MAPPING.setdefault(QUANT_METHOD, MoecoreQuantizationConfig)
    AUTO_QUANTIZER_MAPPING.setdefault(QUANT_METHOD, MoecoreHfQuantizer)


register()
