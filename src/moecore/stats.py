"""Honest statistics: every count is the ``numel`` of a real tensor.

``statistics(model)`` reads a compressed (or original) model; :func:`moecore.planning.plan`
builds a model on the meta device and runs this very counting code, so plan and compress
agree by construction.  The "original" figures of a compressed experts module come from the
shapes (E, H, F) it records: what the fused tensors it replaced held.

Conventions (also written into the statistics as ``notes``):
- the seed's keys (``total_params_*``, ``active_params_*``, ``total_memory_*``) are for the
  experts only, as in the seed; ``model`` holds the whole-model figures;
- active params = unique weights one token touches (all non-expert weights, embeddings
  included, as model cards count them, plus the cores and k experts' factors);
- multiply-adds per token (``macs_*``) = the weight multiply-adds of one decode step of one
  token: every matmul weight the token passes through, once.  Counted: every >=2-D weight
  outside the experts modules that is not an embedding table, i.e. the attention and MLP
  linears, routers, shared experts, dense layers and the LM head (a tied head counts: it is
  multiplied); plus each experts module's active cost, the original ``k·3·H·F`` or the form's
  :meth:`~moecore.forms.Form.active_macs_per_token` (delta: each core once per token plus
  ``k`` low-rank paths; wrapper: the core ``k`` times plus ``k`` wrappers) at the stored
  ranks.  Not counted: embedding look-ups (no matmul), attention over the context (QKᵀ and
  AV, which grow with its length), element-wise ops, norms, activations and biases.  The
  compressed forward pads each rank to whole 16-byte rows (:func:`moecore.grouped.padded_rank`:
  4 float32 or 8 bf16 values); those zero columns cost ``k·(padded - rank)·rank_unit_params``
  more multiply-adds per projection, which the count leaves out (none when the rank is a
  multiple of the padding).  ``tests/test_stats.py`` checks the total against
  ``torch.utils.flop_counter.FlopCounterMode`` on a one-token forward;
- GB = 1e9 bytes, at each tensor's stored dtype.
"""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from rich.table import Table

from .errors import ConfigError, UnsupportedModelError, first_line
from .families import find_experts, is_compressed, text_config, top_k_of
from .forms import FORMS, PROJECTIONS, get_form
from .io_utils import atomic_write_text, user_path
from .version import __version__

STATS_FILENAME = "compression_statistics.yaml"
_GB = 1e9


# ----------------------------------------------------------------------------- helpers
def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in name.split(".")]


def _stored(module, prefix: str = "") -> dict[str, torch.Tensor]:
    """Unique parameters and persistent buffers of ``module`` (what safetensors stores)."""
    out, seen = {}, set()
    for mod_name, mod in module.named_modules(prefix=prefix.rstrip(".")):
        for pname, p in mod.named_parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                out[f"{mod_name}.{pname}" if mod_name else pname] = p
        skip = getattr(mod, "_non_persistent_buffers_set", set())
        for bname, b in mod.named_buffers(recurse=False):
            if b is not None and bname not in skip and id(b) not in seen:
                seen.add(id(b))
                out[f"{mod_name}.{bname}" if mod_name else bname] = b
    return out


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _compressed_layer(name: str, mod, k: int) -> dict[str, Any]:
    """Counts for one ``CompressedExperts`` module, from its stored tensors (quantized ones:
    params = the weights they encode, bytes = codes + scales + zero points as stored)."""
    E, H, F = int(mod.num_experts), int(mod.hidden_size), int(mod.intermediate_size)
    stored = _stored(mod)
    logical = mod.logical_tensors()  # name -> (logical shape, stored names): the module knows its storage
    tensors = {n: math.prod(shape) for n, (shape, _) in logical.items()}
    outside = set(stored) - {part for _, parts in logical.values() for part in parts}
    fdtype = mod.float_dtype
    elsize = torch.empty(0, dtype=fdtype).element_size()
    dims = {"gate": F * H, "up": F * H, "down": H * F}
    report = getattr(mod, "report", None) or {}
    form = get_form(mod.form)
    core = factors = bias = macs = index = 0
    proj_rows = {}
    for p in PROJECTIONS:
        c = tensors[form.core_name(p)]
        f = sum(tensors[n] for n in form.param_names(p))
        row = {"rank": int(mod.ranks[p]), "params_original": E * dims[p], "params_compressed": c + f,
               "core_params": c, "factor_params": f,
               "bytes_compressed": _nbytes(stored[part] for n in form.stored_names(p) for part in logical[n][1])}
        errs = report.get(p) if isinstance(report, dict) else None
        if isinstance(errs, dict):
            row.update({k2: _plain(v) for k2, v in errs.items() if k2 != "rank"})
        proj_rows[p] = row
        core, factors = core + c, factors + f
        index += sum(tensors[n] for n in form.index_param_names(p))  # e.g. per-expert ranks: bytes, not parameters
        macs += form.active_macs_per_token(*mod.proj_shape(p), factor_params=f // E, top_k=k)
    bias = sum(v for n, v in tensors.items() if n.startswith("bias_"))
    other = sum(tensors.values()) - core - factors - bias - index
    if other or outside:
        raise UnsupportedModelError(f"{name}: stored tensors outside the core/factor/bias naming contract")
    weights_orig = E * 3 * H * F
    per_expert_factors = factors // E
    return {
        "module": name, "form": form.name, "num_experts": E, "hidden_size": H, "intermediate_size": F, "top_k": k,
        "params_original": weights_orig + bias, "params_compressed": core + factors + bias,
        "active_params_original": k * (3 * H * F) + k * bias // E,
        "active_params_compressed": core + k * per_expert_factors + k * bias // E,
        "macs_original": k * 3 * H * F, "macs_compressed": macs,
        "bytes_original": (weights_orig + bias) * elsize, "bytes_compressed": _nbytes(stored.values()),
        "projections": proj_rows,
        # experts that saw fewer calibration tokens than calib_prior_tokens (fitted mostly to the layer-wide Gram)
        **({"under_calibrated_experts": max(r["under_calibrated_experts"] for r in proj_rows.values())}
           if all("under_calibrated_experts" in r for r in proj_rows.values()) else {}),
        **({"quant": dataclasses.asdict(mod.quant)} if getattr(mod, "quant", None) is not None else {}),
    }


def _original_layer(name: str, mod, k: int) -> dict[str, Any]:
    """Counts for one uncompressed fused experts module (every tensor has E leading)."""
    tensors = _stored(mod)
    E = int(next(iter(tensors.values())).shape[0])
    n = sum(t.numel() for t in tensors.values())
    weights = sum(t.numel() for t in tensors.values() if t.dim() == 3)
    row = {"module": name, "form": "original", "num_experts": E, "top_k": k,
           "params_original": n, "params_compressed": n,
           "active_params_original": k * n // E, "active_params_compressed": k * n // E,
           "macs_original": k * weights // E, "macs_compressed": k * weights // E,
           "bytes_original": _nbytes(tensors.values()), "bytes_compressed": _nbytes(tensors.values())}
    return row


def _plain(v):
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, float):
        return float(v)
    return v


def _dense_macs(model, experts: tuple[str, ...]) -> int:
    """Multiply-adds per token of the weight matmuls outside the experts modules named in
    ``experts``: every >=2-D weight that is not an embedding table (a tied ``lm_head`` counts,
    as it is multiplied).  The experts modules' own tensors are left to their layer rows."""
    prefixes = tuple(n + "." for n in experts)
    total = 0
    for name, mod in model.named_modules():
        if name in experts or name.startswith(prefixes) or isinstance(mod, torch.nn.Embedding):
            continue
        for _pn, p in mod.named_parameters(recurse=False):
            if p.dim() >= 2:
                total += p.numel()
    return total


def _ratio(a: int, b: int) -> float:
    return round(a / b, 6) if b else 0.0


# ----------------------------------------------------------------------------- public
def statistics(model) -> dict[str, Any]:
    """Parameter, active-parameter, multiply-add and byte counts of ``model`` (compressed or not).

    Every figure comes from real tensors of the model (works on the meta device too); what
    each counts is in the module docstring (multiply-adds: the weight matmuls of one decode
    step of one token, ``model["non_expert_macs"]`` of them outside the experts modules).
    Returns a plain dict: the seed's keys (experts only), ``experts`` and ``model`` blocks
    and one row per MoE layer with per-projection ranks, params and reconstruction errors.
    Raises ``UnsupportedModelError`` if the model has no MoE experts modules.
    """
    # compressed and original experts; UnsupportedModelError for a model without any
    mods = {n: m for n, m, _ in sorted(find_experts(model, "all"), key=lambda f: _natural_key(f.path))}
    k = top_k_of(model.config)
    layers = [(_compressed_layer if is_compressed(m) else _original_layer)(n, m, k) for n, m in mods.items()]
    ex = {key: sum(r[key] for r in layers) for key in (
        "params_original", "params_compressed", "active_params_original", "active_params_compressed",
        "macs_original", "macs_compressed", "bytes_original", "bytes_compressed")}
    prefixes = tuple(n + "." for n in mods)
    stored = _stored(model)
    rest = {n: t for n, t in stored.items() if not n.startswith(prefixes)}
    rest_params, rest_bytes = sum(t.numel() for t in rest.values()), _nbytes(rest.values())
    rest_macs = _dense_macs(model, tuple(mods))
    forms = sorted({r["form"] for r in layers})
    whole = {
        "params_original": rest_params + ex["params_original"],
        "params_compressed": rest_params + ex["params_compressed"],
        "active_params_original": rest_params + ex["active_params_original"],
        "active_params_compressed": rest_params + ex["active_params_compressed"],
        "macs_original": rest_macs + ex["macs_original"], "macs_compressed": rest_macs + ex["macs_compressed"],
        "bytes_original": rest_bytes + ex["bytes_original"], "bytes_compressed": rest_bytes + ex["bytes_compressed"],
        "non_expert_params": rest_params, "non_expert_macs": rest_macs,
    }
    for block in (ex, whole):
        block["compression_ratio"] = _ratio(block["params_compressed"], block["params_original"])
        block["active_ratio"] = _ratio(block["active_params_compressed"], block["active_params_original"])
        block["macs_ratio"] = _ratio(block["macs_compressed"], block["macs_original"])
        block["bytes_ratio"] = _ratio(block["bytes_compressed"], block["bytes_original"])
    return {
        "moecore_version": __version__,
        "model_type": getattr(text_config(model.config), "model_type", None),
        "form": forms[0] if len(forms) == 1 else forms,
        "top_k": k,
        "num_moe_layers": len(layers),
        # the seed's keys: experts only
        "total_params_original": ex["params_original"],
        "total_params_compressed": ex["params_compressed"],
        "total_compression_ratio": ex["compression_ratio"],
        "total_reduction_percent": round(100 * (1 - ex["compression_ratio"]), 4),
        "active_params_original": ex["active_params_original"],
        "active_params_compressed": ex["active_params_compressed"],
        "active_compression_ratio": ex["active_ratio"],
        "active_change_percent": round(100 * (ex["active_ratio"] - 1), 4),
        "active_macs_original": ex["macs_original"],
        "active_macs_compressed": ex["macs_compressed"],
        "active_macs_ratio": ex["macs_ratio"],
        "total_memory_original_gb": round(ex["bytes_original"] / _GB, 6),
        "total_memory_compressed_gb": round(ex["bytes_compressed"] / _GB, 6),
        "memory_saved_gb": round((ex["bytes_original"] - ex["bytes_compressed"]) / _GB, 6),
        "experts": ex,
        "model": whole,
        "layers": layers,
        "notes": ("seed keys are experts only; active params include all non-expert weights; "
                  "multiply-adds = weight matmuls of one decode-step token (LM head, non-expert linears, "
                  "routers, shared experts, active experts at the stored ranks; no embedding look-up, "
                  "attention over the context, element-wise ops or norms); GB = 1e9 bytes"
                  + _form_notes(forms)),
    }


def _form_notes(forms: list[str]) -> str:
    """What the compressed forms in ``forms`` say about their counts (:attr:`Form.counts_note`);
    other names (``"original"``: a layer left as it was) say nothing."""
    return "".join(f"; {FORMS[f].counts_note}" for f in dict.fromkeys(forms) if f in FORMS and FORMS[f].counts_note)


def write_statistics_yaml(stats: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``stats`` as YAML to ``path`` atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    text = "# moecore compression statistics: counted from real stored tensors\n"
    text += yaml.safe_dump(stats, sort_keys=False, default_flow_style=False, width=120)
    atomic_write_text(path, text)
    return path


def read_statistics_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a ``compression_statistics.yaml`` (ConfigError if it is not a statistics mapping)."""
    try:
        with user_path(path):
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {first_line(exc)}") from exc
    if not isinstance(data, dict) or "total_params_original" not in data:
        raise ConfigError(f"{path} is not a moecore statistics file")
    return data


def _fmt_int(n: int) -> str:
    return f"{n:,}"


def print_table(stats: dict[str, Any], console=None, per_layer: bool = True) -> None:
    """Print ``stats`` (from :func:`statistics` / :func:`moecore.planning.plan` / the YAML) as rich tables:
    a summary (experts and whole model, original vs compressed) and one row per layer."""
    console = console or Console()
    title = f"moecore statistics ({stats.get('model_type')}, form {stats.get('form')}, top-{stats.get('top_k')})"
    t = Table(title=title)
    for col in ("", "original", "compressed", "ratio"):
        t.add_column(col, justify="right" if col else "left")
    for scope in ("experts", "model"):
        b = stats[scope]
        for label, key, rkey in (("params", "params", "compression_ratio"),
                                 ("active params / token", "active_params", "active_ratio"),
                                 ("multiply-adds / token", "macs", "macs_ratio"),
                                 ("bytes", "bytes", "bytes_ratio")):
            t.add_row(f"{scope}: {label}", _fmt_int(b[f"{key}_original"]), _fmt_int(b[f"{key}_compressed"]),
                      f"{100 * b[rkey]:.1f}%")
    t.add_row("experts memory saved (GB)", "", f"{stats['memory_saved_gb']:.4f}", "")
    console.print(t)
    if not per_layer:
        return
    lt = Table(title="per layer / projection")
    for col in ("module", "proj", "rank", "params", "of original", "weight err", "output err"):
        lt.add_column(col, justify="left" if col in ("module", "proj") else "right", overflow="fold")
    for row in stats.get("layers", []):
        for p, pr in (row.get("projections") or {}).items():
            we, oe = pr.get("weight_rel_error"), pr.get("output_rel_error")
            lt.add_row(row["module"], p, str(pr["rank"]), _fmt_int(pr["params_compressed"]),
                       f"{100 * pr['params_compressed'] / pr['params_original']:.1f}%",
                       "-" if we is None else f"{we:.4f}", "-" if oe is None else f"{oe:.4f}")
    if lt.row_count:
        console.print(lt)
