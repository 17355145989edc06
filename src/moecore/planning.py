"""``plan(hf_config, cfg)``: the statistics of a compression from a config alone (no weights).

The model is built on the meta device, its experts are swapped for meta
``CompressedExperts`` with the ranks the budget solver gives, and :func:`moecore.stats.statistics`
counts them: plan and compress share one counting code, so they agree by construction.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from .config import CompressionConfig
from .errors import ConfigError, FileAccessError
from .families import find_experts
from .fitting import projection_shapes, solve_ranks
from .forms import PROJECTIONS
from .hf_integration import swap_in_compressed
from .stats import statistics, text_config


#: bounds on what ``plan`` builds on the meta device (real models: <= 200 layers, <= 1,024
#: experts); beyond them a config is corrupt or a typo, and building it takes minutes and GBs
MAX_PLAN_LAYERS, MAX_PLAN_EXPERTS = 4096, 1 << 16


def _check_bounds(hf: PretrainedConfig) -> PretrainedConfig:
    text = text_config(hf)
    layers = getattr(text, "num_hidden_layers", None)
    if isinstance(layers, int) and layers > MAX_PLAN_LAYERS:
        raise ConfigError(f"the config has {layers:,} decoder layers; plan builds at most {MAX_PLAN_LAYERS:,}")
    for name in ("num_experts", "num_local_experts", "n_routed_experts"):
        n = getattr(text, name, None)
        if isinstance(n, int) and n > MAX_PLAN_EXPERTS:
            raise ConfigError(f"the config has {n:,} experts ({name}); plan builds at most {MAX_PLAN_EXPERTS:,}")
    return hf


def _load_hf_config(hf_config):
    return _check_bounds(_read_hf_config(hf_config))


def _read_hf_config(hf_config):
    if isinstance(hf_config, PretrainedConfig):
        return hf_config
    if isinstance(hf_config, dict):
        d = dict(hf_config)
        if "model_type" not in d:
            raise ConfigError("config dict has no model_type")
        return AutoConfig.for_model(d.pop("model_type"), **d)
    path = Path(hf_config)
    if not path.exists():
        raise FileAccessError(f"config not found: {path}")
    try:
        return AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"cannot read a transformers config from {path}: {first}") from exc


def plan(hf_config, cfg, dtype: torch.dtype | str | None = None) -> dict[str, Any]:
    """The statistics of ``compress(model, cfg)`` from a config alone (no weights).

    ``hf_config`` is a ``PretrainedConfig``, a config dict, or a path to ``config.json`` (or its
    folder).  The model is built on the meta device (real tensor shapes, no memory), its
    experts are swapped for meta ``CompressedExperts`` with the ranks the budget solver
    gives (the same :func:`moecore.fitting.solve_ranks` that ``compress`` uses), and
    :func:`statistics` counts them.  ``allocation="greedy"`` needs weights, so plan uses
    uniform ranks for it and says so in ``notes``.  ``dtype`` defaults to the config's.
    """
    if not isinstance(cfg, CompressionConfig):
        raise ConfigError(f"cfg must be a CompressionConfig, got {type(cfg).__name__}")
    hf = _load_hf_config(hf_config)
    if dtype is None:
        dtype = getattr(text_config(hf), "dtype", None) or getattr(hf, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ConfigError(f"unknown dtype {dtype!r} (e.g. float32, bfloat16, float16)")
        dtype = getattr(torch, dtype)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf, dtype=dtype)
    found = find_experts(model)
    experts = [(path, layout) for path, _, layout in found]
    note = ""
    if cfg.rank is None and cfg.allocation == "greedy":
        cfg = dataclasses.replace(cfg, allocation="uniform")
        note = "; greedy allocation needs weights: plan shows uniform ranks"
    ranks = solve_ranks([s for path, m, layout in found for s in projection_shapes(path, m, layout)], cfg)
    layers = {path: {p: int(ranks[(path, p)]) for p in PROJECTIONS} for path, _ in experts}
    quant = dataclasses.asdict(cfg.quant) if cfg.quant is not None else None
    swap_in_compressed(model, {"form": cfg.form, "layers": layers, "quant": quant})
    out = statistics(model)
    out["notes"] += "; planned from the config alone (meta device)" + note
    out["compression_config"] = cfg.to_dict()
    return out
