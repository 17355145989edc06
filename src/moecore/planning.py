"""``plan(hf_config, cfg)``: the statistics of a compression from a config alone (no weights).

The model is built on the meta device, its experts are swapped for meta
``CompressedExperts`` with the ranks the budget solver gives, and :func:`moecore.stats.statistics`
counts them: plan and compress share one counting code, so they agree by construction.

It also estimates what ``moecore compress`` will need (:func:`memory_estimate`, in
``plan["memory_estimate"]``): the output's size on disk at the chosen dtype, and the peak host
and GPU memory of the layer engine on the largest decoder layer.  With b bytes per weight at
the dtype, E experts of that layer, d its hidden size, F its expert width, k experts per
token, T = ``calib_max_tokens``:

* on the compute device (GPU memory with ``--device cuda``):
  the non-layer weights (embeddings, norms, head) + the layer's original weights (its
  experts only up to ``expert_read_gb``: a larger experts module is read that much at a
  time, :mod:`moecore.expert_source`) + its compressed weights + one Gram stack
  E·max(d, F)²·g (g = 8 bytes up to 1 GiB, else 4; twice with ``core="output"``, which
  keeps the raw Grams, while quantized storage works from the whitening factors; a stack
  above 4 GiB lives in host memory instead; a stack in host memory larger than
  ``gram_host_gb``, by default half the memory available, is a memory-mapped file on disk
  holding its lower triangle, about half its bytes, :mod:`moecore.gram_store`: not counted)
  + what the fit allocates for its largest projection (:func:`moecore.fitting.fit_reserve`,
  which the engine also uses): the factor stacks in the fit's layout (the ragged form pads
  every expert to ``expert_rank_cap`` x the mean rank) at 4 bytes (8 below 512 on the short
  side and 1 GiB) and its chunk's working set min(``fit_memory_gb``,
  E·8·(3·d_out·d_in + 2·d_in²)) (halved where the fit computes in float32)
  + the experts' inputs T·d·4 (one row per token; an expert's rows are gathered when its
  Gram is built) and their outputs T·d·4;
* in host memory besides: the calibration activations 2·T·d·b (the layer's inputs and
  outputs), the layer read from disk and written back (original + compressed weights), and
  about 1 GiB for Python, torch and transformers;
* on a CPU alone, one memory holds each of these once: the non-layer weights, the layer read
  (while fitting, only its non-expert weights: the fit chunk's experts are in the working
  set), the activations, the runtime, the Grams in memory (a stack is kept there if it fits
  half of what will be available when it is built, after the layer's other allocations and
  the fit's, :func:`moecore.fitting.fit_reserve`; when the larger one is on disk, the
  smaller one, E·min(d, F)²·g, may still be in memory)
  and the working set; then the larger of the finished projections' stored tensors (2/3 of the
  compressed experts) with the current projection's factor stacks and, at the projection's end,
  its stored tensors at the dtype (written from the stacks one expert at a time), and the compressed experts
  twice (the stored tensors and the module built from them, at the end of the fit); a half-precision layer is
  computed in float32 (``calibration.widen_layer``): its non-expert weights at 4 bytes
  instead of b (the experts stay at b bytes, cast one expert at a time where used); its
  compressed experts at 4 bytes where the engine then trains or runs them in that float32
  copy (recovery, ``propagate="compressed"``) or quantizes them, else at b (built in the
  checkpoint's dtype at once); the activations at 4 bytes throughout;
* in-engine recovery (``recover_steps`` > 0 with float storage: the engine skips it for
  quantized storage), after the fit: the compressed module swapped in and the original
  experts freed, no Grams and no fit working set, but the trained tensors
  in float32 with their gradients and Adam's two moments (16 bytes per element: the factors,
  padded to the largest expert rank, at most ``expert_rank_cap`` x the mean, when the form
  trains padded, and the cores with ``recover_train_core``; 8 more per factor element for
  each step's operands and their gradients; a layer whose factors need more than
  ``recover_memory_gb`` at these 24 bytes counts one chunk of experts' factors and no cores,
  :func:`moecore.recovery_chunks.expert_chunk`, and the layer's output on every row and a chunk's
  target, T·d·4 each) and the routed inputs and the original block's
  outputs, T·d·4 each, and their split into fitted and held-out rows, as much again.

The estimate is the largest of the phases.

It is an estimate for planning, not a bound (measured against it on this project's CPU:
benchmarks/RESULTS.md §7j).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from .recovery_chunks import TRAINED_BYTES
from .config import CompressionConfig
from .errors import ConfigError, FileAccessError, first_line
from .families import config_dtype, find_experts, text_config
from .fitting import DEVICE_GRAM_LIMIT, fit_reserve, gram_storage, host_stack_limit, projection_shapes, solve_ranks
from .gram_store import stored_elements
from .heap import available_host_bytes
from .forms import PROJECTIONS, get_form
from .checkpoint_format import swap_in_compressed
from .modeling import load_meta
from .stats import statistics
from .surgery import decoder_layers

GIB = 1 << 30
RUNTIME_BYTES = 1 * GIB  # Python, torch and transformers themselves


def source_quantization(hf) -> str | None:
    """The ``quant_method`` of a config whose checkpoint is stored quantized (FP8, MXFP4, ...)."""
    qc = getattr(hf, "quantization_config", None) or getattr(text_config(hf), "quantization_config", None)
    if not qc:
        return None
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return str(method or "quantized")


def _nbytes(params, dtype: torch.dtype) -> int:
    size = torch.empty(0, dtype=dtype).element_size()
    return sum(p.numel() * (size if p.is_floating_point() else p.element_size()) for p in params)


def memory_estimate(stack_path: str, layer_bytes_by_index: list[int], layer_stats: list[dict], rest_bytes: int,
                    cfg: CompressionConfig, dtype: torch.dtype, output_bytes: int) -> dict[str, Any]:
    """Peak memory of ``moecore compress`` on its largest layer (formula in the module docstring).
    ``layer_bytes_by_index``: each original decoder layer's bytes at ``dtype``; ``layer_stats``:
    the plan's per-layer rows; ``rest_bytes``: the non-layer weights; ``output_bytes``: the
    compressed model's."""
    b = torch.empty(0, dtype=dtype).element_size()
    row = max(layer_stats, key=lambda r: r["bytes_original"])
    index = int(row["module"][len(stack_path) + 1:].split(".")[0])  # model.layers.I.mlp.experts -> I
    layer_bytes = layer_bytes_by_index[index]
    compressed = layer_bytes - row["bytes_original"] + row["bytes_compressed"]
    limit = int(cfg.expert_read_gb * GIB)  # larger experts modules are read this much at a time
    rest_of_layer = layer_bytes - row["bytes_original"]
    layer_bytes = rest_of_layer + min(row["bytes_original"], limit)
    e, d, f, t = row["num_experts"], row["hidden_size"], row["intermediate_size"], cfg.calib_max_tokens
    dmax = max(d, f)

    def gram_bytes(dim: int) -> int:  # one (E, dim, dim) stack in the dtype the fit stores it in
        return e * dim * dim * gram_storage(e, dim, cfg, torch.device("cpu"))[0].itemsize

    grams = gram_bytes(dmax) * (2 if cfg.core == "output" else 1)
    # the fit's factor stacks and working set for its largest projection, as the engine counts them
    views = {p: torch.empty((e, d, f) if p == "down" else (e, f, d), device="meta") for p in PROJECTIONS}
    reserve = fit_reserve(views, {p: r["rank"] for p, r in row["projections"].items()}, cfg, torch.device("cpu"))
    compact = max(r["factor_params"] for r in row["projections"].values())  # one projection's factors stored
    device = rest_bytes + layer_bytes + compressed + reserve + 2 * t * d * 4
    host = 2 * t * d * b + layer_bytes + compressed + RUNTIME_BYTES
    spill = grams > DEVICE_GRAM_LIMIT
    # a host-memory stack above gram_host_gb (default: half the available memory) is a file on disk
    avail = available_host_bytes()
    on_disk = grams > host_stack_limit(cfg, available=avail)  # beside a GPU (whose fit reserves no host memory)
    # CPU: half precision computed in float32, but for the experts (cast one at a time)
    wide = (4 - b) // b if b < 4 else 0
    acts = 2 * t * d * (4 - b) if b < 4 else 0
    # CPU only, one memory: the layer read and the compressed layer counted once each; while the
    # fit runs, the finished projections (stored) beside the current one's stacks, and at its end
    # the stored tensors beside the module built from them
    cpu = rest_bytes + layer_bytes + 2 * t * d * (b + 4) + RUNTIME_BYTES + rest_of_layer * wide + acts
    # a half-precision layer's compressed experts are built in float32 where the engine then
    # trains or runs them in the layer's float32 copy (recovery, a compressed propagation) or
    # quantizes them, else in the checkpoint's dtype at once (fitting.fit_experts' store_dtype)
    idle = not cfg.recover_steps and cfg.propagate == "original" and cfg.quant is None
    cb = 4 if b < 4 and not idle else b  # bytes per compressed element on a CPU
    cexp = row["bytes_compressed"] * cb // b
    dmin = min(d, f)  # the other projection's stack, in memory when small enough while the larger is on disk
    small = gram_bytes(dmin)
    # as fitting.gram_stack decides when the stack is built: what is available then (less what the
    # layer already holds: the read, gate and up done) less what the fit allocates after it, halved;
    # gate/up's stack (of d) is built before any projection is fitted, down's (of F) after two
    on_disk_cpu = grams > host_stack_limit(cfg, reserve, cpu + (2 * cexp // 3 if f > d else 0), avail)
    small_limit = host_stack_limit(cfg, reserve, cpu + 2 * cexp // 3, avail)
    grams_mem = small if on_disk_cpu and small <= small_limit else 0 if on_disk_cpu else grams
    calibrating = cpu + grams_mem + 2 * cexp // 3  # the down projection's Grams beside gate and up, done
    # while fitting, the experts read are the fit chunk's (in the reserve), not a whole read block
    # (at a projection's end its stored tensors are written from the stacks at the dtype, compact)
    fitting = cpu - (layer_bytes - rest_of_layer) + grams_mem + max(2 * cexp // 3 + reserve + compact * cb, 2 * cexp)
    recovering = 0
    if cfg.recover_steps and cfg.quant is None:  # as the engine: after the fit, the originals and Grams freed
        factors = sum(r["factor_params"] for r in row["projections"].values())
        form = get_form(cfg.form)
        if form.training_form:  # trained padded to the largest expert rank (at most cap x mean)
            factors = int(factors * cfg.expert_rank_cap)
        cores = sum(r["core_params"] for r in row["projections"].values()) if cfg.recover_train_core else 0
        per_expert = factors // e
        chunk = int(cfg.recover_memory_gb * GIB) // max(1, TRAINED_BYTES * per_expert)
        chunked = get_form(form.training_form or form.name).per_expert_factors and chunk < e
        if chunked:  # trained a chunk at a time, factors only; the layer's output kept on every row
            factors, cores = max(1, chunk) * per_expert, 0
        train = (16 * (factors + cores)  # float32 tensor, gradient and Adam's two moments
                 + (TRAINED_BYTES - 16) * factors  # each step's operands built from the factors, and their gradients
                 + 4 * t * d * 4  # the experts' inputs and targets, each also split into fit / held-out rows
                 + (2 * t * d * 4 if chunked else 0))  # in chunks: the layer's output and a chunk's target
        recovering = device - (layer_bytes - rest_of_layer) - reserve + train
        recovering_cpu = cpu - (layer_bytes - rest_of_layer) + compressed + train
    else:
        recovering_cpu = 0
    gpu = max(device + (0 if spill else grams), recovering)
    return {"layer": f"{stack_path}.{index}", "gpu_gib": gpu / GIB,
            "host_gib_with_gpu": (host + (grams if spill and not on_disk else 0)) / GIB,
            "grams_on_disk_gib": (grams * stored_elements(dmax) / dmax**2 if on_disk_cpu else 0) / GIB,  # lower triangle
            "host_gib_cpu_only": max(calibrating, fitting, recovering_cpu) / GIB,
            "output_gb": output_bytes / 1e9, "dtype": str(dtype).replace("torch.", "")}


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
        first = first_line(exc)
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
        dtype = config_dtype(hf)
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ConfigError(f"unknown dtype {dtype!r} (e.g. float32, bfloat16, float16)")
        dtype = getattr(torch, dtype)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf, dtype=dtype)
    found = find_experts(model)
    stack_path, stack = decoder_layers(model, found[0][0])
    seen = {id(p) for p in stack.parameters()}
    layer_bytes = [_nbytes(layer.parameters(), dtype) for layer in stack]  # before the swap below
    rest_bytes = _nbytes([p for p in {id(p): p for p in model.parameters()}.values() if id(p) not in seen], dtype)
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
    mem = memory_estimate(stack_path, layer_bytes, out["layers"], rest_bytes, cfg, dtype,
                          out["model"]["bytes_compressed"])
    out["memory_estimate"] = mem
    quantized = source_quantization(hf)
    if quantized:
        out["source_quantization"] = quantized
        out["notes"] += (f"; the checkpoint is stored quantized ({quantized}): the original sizes are those of "
                         f"its {mem['dtype']} (dequantized) weights, not of its files")
    out["compression_config"] = cfg.to_dict()
    return out


def recount(model_dir) -> dict[str, Any]:
    """The statistics of a saved model directory, compressed or not, from its config and its
    safetensors headers alone: the model is built on the meta device (no weights read, so
    no memory or device is needed at any scale), its compressed layers are rebuilt from the
    recorded ``quantization_config`` (form, ranks, layout, quantized storage, and the
    per-projection errors recorded at compression), every stored moecore tensor's shape is
    checked against them, and :func:`statistics` counts the result.  Tensors are counted in
    the config's dtype, as ``from_pretrained(dtype="auto")`` loads them."""
    model = load_meta(model_dir).model
    out = statistics(model)
    out["notes"] += "; recounted from the checkpoint's config and tensor headers (meta device, no weights read)"
    return out


def free_gpu_bytes(device: torch.device) -> int | None:
    """Free memory of the CUDA ``device`` now (``torch.cuda.mem_get_info``), else ``None``: the one
    place moecore reads it (``compress``'s warning, the CLI's placement of a model)."""
    return int(torch.cuda.mem_get_info(device)[0]) if device.type == "cuda" else None


def memory_shortfall(model_dir, cfg: CompressionConfig, device: torch.device, dtype: torch.dtype | None,
                     available: int | None = None) -> str | None:
    """What to tell a user whose machine lacks the memory :func:`memory_estimate` gives for
    ``compress_checkpoint(model_dir, ..., cfg, device=device)``'s largest layer (host memory,
    and GPU memory with a CUDA ``device``), or ``None`` when it fits or cannot be told.
    ``available``: host bytes free (default :func:`available_host_bytes`)."""
    try:
        mem = plan(Path(model_dir), cfg, dtype)["memory_estimate"]
    except Exception:  # noqa: BLE001 - an estimate that cannot be made must not stop a compression
        return None
    gpu = device.type == "cuda"
    host_need = (mem["host_gib_with_gpu"] if gpu else mem["host_gib_cpu_only"]) * GIB
    host_free = available if available is not None else available_host_bytes()
    short = []
    if host_free is not None and host_need > host_free:
        short.append(f"{host_need / GIB:.1f} GiB of host memory, {host_free / GIB:.1f} GiB free")
    free = free_gpu_bytes(device) if torch.cuda.is_available() else None
    if free is not None and mem["gpu_gib"] * GIB > free:
        short.append(f"{mem['gpu_gib']:.1f} GiB of GPU memory, {free / GIB:.1f} GiB free")
    if not short:
        return None
    hint = "a GPU (--device cuda)" if not gpu else "a GPU with more memory"
    return (f"the largest layer ({mem['layer']}) is estimated to need " + " and ".join(short)
            + f" (moecore plan's estimate): the run may be killed part-way; consider {hint}, fewer "
            "calibration tokens (calib_max_tokens, --calib-max-tokens) or a smaller fit_memory_gb (--fit-memory-gb)")

