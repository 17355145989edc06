"""The moecore checkpoint format: what a compressed folder holds beyond plain transformers,
and how a model is rebuilt from it (independent of how transformers is told about it, which is
:mod:`moecore.hf_integration`'s job).

A compressed checkpoint's ``config.json`` carries::
    "quantization_config": {"quant_method": "moecore", "form": "delta",
                            "layout": {...ExpertsLayout...}, "moecore_version": "...",
                            "layers": {"model.layers.0.mlp.experts": {"gate": 8, "up": 8, "down": 8}, ...}}

(a layer entry may also override ``form`` / ``layout``, and carries ``quant`` for quantized
storage and ``report``, the errors measured at compression): :func:`build_quantization_config`
writes it, :func:`swap_in_compressed` rebuilds the empty compressed modules from it, and
``moecore_config.json`` beside it (:func:`attach_compression_config`) records how the model was made.

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

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from .compressed_experts import CompressedExperts
from .config import CONFIG_FILENAME, CompressionConfig
from .errors import CheckpointError, ConfigError, UnsupportedModelError, first_line
from .families import ExpertsLayout, find_experts, layout_of
from .forms import CHECKPOINT_FORM, FORMS, PROJECTIONS
from .model_card import base_model_of
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


def ignore_guards(model, paths: dict[str, Any]) -> None:
    """Let the guards of :func:`load_guards` load nowhere, without a report line."""
    patterns = {re.escape(LOAD_NOTICE_KEY)} | {rf"(^|\.){re.escape(f'{p}.{m.layout.down_attr}')}$"
                                                for p, m in paths.items()}
    model._keys_to_ignore_on_load_unexpected = set(model._keys_to_ignore_on_load_unexpected or ()) | patterns


def attach_compression_config(model) -> None:
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
        first = first_line(exc)
        raise CheckpointError(f"malformed {f}: {first}") from exc


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
        new = CompressedExperts(  # with quantized storage where the spec records it
            e, h, f, spec.get("form", qconfig.get("form", CHECKPOINT_FORM)), {p: spec[p] for p in PROJECTIONS},
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


def stored_names() -> tuple[str, ...]:
    """Every tensor name a registered form stores (cores and factors; quantized parts start
    with them)."""
    return tuple(n for form in FORMS.values() for p in PROJECTIONS for n in form.stored_names(p))


def is_moecore_key(key: str, names: tuple[str, ...] | None = None) -> bool:
    """Whether ``key`` names a tensor moecore stores: a form's core or factor (as the forms name
    them), whole or one part of its quantized storage.  ``names``: :func:`stored_names`, when
    the caller checks many keys."""
    return key.rsplit(".", 1)[-1].startswith(names or stored_names())


def layer_number(key: str) -> int | None:
    """The decoder layer of a checkpoint key or module path: its first number component
    (``model.layers.3.block_sparse_moe.experts.delta_a_gate`` -> 3).  transformers' key
    renames between a family's stored and module names (Mixtral's ``block_sparse_moe`` ->
    ``mlp``) keep it."""
    m = re.search(r"(?:^|\.)(\d+)\.", key)
    return int(m.group(1)) if m else None


def check_stored_headers(model, files, swapped: dict[str, Any]) -> None:
    """Before ``from_pretrained`` loads anything: every moecore tensor the safetensors
    ``files`` store (read from their headers only) belongs to a layer the
    ``quantization_config`` lists (``swapped``: ``{path: compressed module}``), and has the
    shape that entry's rank, bits and group size give.  Otherwise one ``CheckpointError``
    naming the layer or the tensor: an unlisted layer would load as the original experts
    with random weights, and a changed shape ends in transformers' load report."""
    # per layer number: (path, {tensor name: expected shape}) of each listed experts module
    by_layer: dict[int | None, list[tuple[str, dict[str, tuple[int, ...]]]]] = {}
    for path, module in swapped.items():
        shapes = {n: tuple(t.shape) for n, t in [*module.named_parameters(recurse=False),
                                                  *module.named_buffers(recurse=False)]}
        by_layer.setdefault(layer_number(path), []).append((path, shapes))
    names = stored_names()
    for f in sorted(str(f) for f in files or () if str(f).endswith(".safetensors")):
        try:
            with safe_open(f, framework="pt") as fh:
                stored = [(k, tuple(fh.get_slice(k).get_shape())) for k in fh.keys() if is_moecore_key(k, names)]
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"corrupt safetensors file {f}: {first_line(exc)}") from exc
        for key, shape in stored:
            owners = by_layer.get(layer_number(key))
            if not owners:
                raise CheckpointError(f"{Path(f).name} stores compressed tensors for layer {layer_number(key)} "
                                      f"(e.g. {key}), which its quantization_config does not list: that layer "
                                      "would load with random experts")
            leaf = key.rsplit(".", 1)[-1]
            for path, shapes in owners:
                if leaf in shapes and shapes[leaf] != shape:
                    raise CheckpointError(f"{Path(f).name}: {key} has shape {shape}, but the quantization_config's "
                                          f"entry for {path} (form, rank, bits, group size) gives {shapes[leaf]}")
