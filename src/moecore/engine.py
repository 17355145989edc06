"""The layer-by-layer engine: one implementation behind both ``moecore.compress(model, cfg)``
(in memory) and ``moecore compress DIR -o OUT`` (streamed from and to sharded safetensors).

Per decoder layer, in order:

1. **load**: the :class:`LayerStore` brings the layer's weights onto the compute device
   (in memory: a move if needed; streaming: read from the shards);
2. **calibrate**: the *original* layer runs on the current calibration activations with a
   pre-hook on its experts module that keeps what reaches the experts (inputs, top-k
   indices and weights);
3. **fit**: Grams, whitening, core and factors (:func:`moecore.fitting.fit_experts`); with
   ``recover_steps`` the factors are then trained by Adam to the original block's
   routing-weighted output on the same calibration rows (:mod:`moecore.block_recovery`;
   kept only if the held-out sequences' block error fell); then the experts module is
   swapped for a :class:`~moecore.compressed_experts.CompressedExperts`;
4. **propagate**: the original layer's outputs become the next layer's inputs
   (``propagate="original"``, the default), or the *compressed* layer runs to produce them
   (``"compressed"``, sequential calibration);
5. **done**: the store writes / frees the layer.

Only one layer's calibration state exists at a time.  ``allocation="greedy"`` needs every
layer's spectrum before any rank is fixed, so it costs one extra pass over the layers
(calibrate + spectra with original propagation, no fitting).
"""
from __future__ import annotations

import gc
import os
import resource
import time
from typing import Any, Protocol

import torch
from torch import nn

from .block_recovery import block_targets, heldout_rows, sequence_ids, train_block
from .calibration import (RoutedInputs, calibrate_layer, capture_layer_inputs, narrow_module, restore_layer, run_layer,
                          widen_layer)
from .compressed_experts import PROJECTIONS
from .config import CompressionConfig
from .errors import ConfigError, UnsupportedModelError
from .expert_source import ExpertSource, InMemorySource, SourcedExperts
from .families import ExpertsLayout, find_experts, top_k_of
from .fitting import fit_experts, projection_shapes, rank_gains, solve_ranks
from .heap import bounded_host_heap, trim
from .progress import progress_bar
from .surgery import decoder_layers, replace_module


class LayerStore(Protocol):
    """Where decoder layers come from and where they go."""

    def load(self, index: int, layer: nn.Module) -> None:
        """Make ``layer``'s weights real and on the compute device."""

    def done(self, index: int, layer: nn.Module, hidden: list[torch.Tensor] | None) -> None:
        """``layer`` is final (compressed); ``hidden`` are its outputs on the calibration batches."""

    def release(self, index: int, layer: nn.Module) -> None:
        """``layer`` was only read (greedy's first pass): free it without writing."""

    def experts(self, index: int, rel: str, layout: ExpertsLayout, module: nn.Module) -> ExpertSource:
        """Where the weights of the experts module ``module`` at ``rel`` in layer ``index`` come from."""


class InMemoryStore:
    """Layers already live in the model; ``device`` may differ from where they live (e.g. a
    model in host memory compressed on one GPU): each layer visits ``device`` and goes back."""

    def __init__(self, device: torch.device):
        self.device = device
        self._home: dict[int, torch.device] = {}

    def load(self, index: int, layer: nn.Module) -> None:
        home = next(layer.parameters()).device
        if home != self.device:
            self._home[index] = home
            layer.to(self.device)

    def release(self, index: int, layer: nn.Module) -> None:
        home = self._home.pop(index, None)
        if home is not None:
            layer.to(home)

    def done(self, index: int, layer: nn.Module, hidden) -> None:
        self.release(index, layer)

    def experts(self, index: int, rel: str, layout: ExpertsLayout, module: nn.Module) -> ExpertSource:
        return InMemorySource(module, layout)


def release_memory(device: torch.device) -> None:
    """Give the freed memory of a finished layer back: Python garbage, glibc's heap (which
    otherwise keeps freed blocks and lets resident memory creep up layer after layer) and
    the CUDA cache."""

    gc.collect()
    trim()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def resident_bytes() -> int | None:
    """Current resident memory of this process (Linux ``/proc/self/statm``), else None."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak memory of this process so far, in GiB: ``host`` (peak resident set size,
    ``getrusage``) and, on a CUDA device, ``gpu`` (``torch.cuda.max_memory_allocated``)."""
    out = {"host": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2 ** 30}  # Linux: KiB
    if device.type == "cuda":
        out["gpu"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    return out


def layer_error(layer: nn.Module) -> tuple[str, float] | None:
    """The largest relative error over one compressed layer's projections, from the fit reports:
    ``("out", e)`` in output space (with calibration) or ``("weight", e)`` without."""
    errs: dict[str, list[float]] = {"out": [], "weight": []}
    for m in layer.modules():
        for entry in (getattr(m, "report", None) or {}).values():
            if isinstance(entry, dict):
                for key, name in (("output_rel_error", "out"), ("weight_rel_error", "weight")):
                    if isinstance(entry.get(key), (int, float)):
                        errs[name].append(float(entry[key]))
    for name in ("out", "weight"):
        if errs[name]:
            return name, max(errs[name])
    return None


def progress_postfix(layer: nn.Module, device: torch.device, fit_s: float) -> dict[str, str]:
    """What the progress bar shows after a layer: fit time, the layer's worst relative error
    (``out_err``: output space, ``w_err``: weight space) and peak host / GPU memory."""
    post = {"fit": f"{fit_s:.1f}s"}
    err = layer_error(layer)
    if err is not None:
        post["out_err" if err[0] == "out" else "w_err"] = f"{err[1]:.3f}"
    for where, gib in peak_memory(device).items():
        post[f"peak_{where}"] = f"{gib:.1f}GiB"
    return post


def experts_by_layer(model: nn.Module, which: str = "original",
                     ) -> tuple[str, nn.ModuleList, dict[int, list[tuple[str, ExpertsLayout]]]]:
    """The decoder-layer stack and, per layer index, its experts modules as
    ``(path relative to the layer, layout)`` (``which``: as :func:`~moecore.families.find_experts`)."""
    found = find_experts(model, which)
    stack_path, stack = decoder_layers(model, found[0][0])
    by_layer: dict[int, list[tuple[str, ExpertsLayout]]] = {}
    for path, _, layout in found:
        if not path.startswith(stack_path + "."):
            raise UnsupportedModelError(f"{path} is outside the decoder layers {stack_path}")
        index, _, rel = path[len(stack_path) + 1:].partition(".")
        by_layer.setdefault(int(index), []).append((rel, layout))
    return stack_path, stack, by_layer


def check_top_k(model: nn.Module, by_layer: dict, stack: nn.ModuleList) -> None:
    """``num_experts_per_tok`` must not exceed the number of experts of any layer."""

    k = top_k_of(model.config)
    for i, mods in by_layer.items():
        for rel, layout in mods:
            e = layout.split(stack[i].get_submodule(rel))["gate"].shape[0]
            if k > e:
                raise ConfigError(f"the config routes each token to {k} experts but layer {i} has only {e} "
                                  f"(num_experts_per_tok > number of experts)")


def make_batches(seqs: list[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
    """Full-length sequences in batches of ``batch_size``; a shorter last sequence on its own."""
    if not seqs:
        return []
    full = [s for s in seqs if s.numel() == seqs[0].numel()]
    rest = [s for s in seqs if s.numel() != seqs[0].numel()]
    out = [torch.stack(full[i: i + batch_size]) for i in range(0, len(full), batch_size)]
    return out + [s[None] for s in rest]


class Engine:
    """Runs the per-layer pipeline over ``model`` (see the module docstring).

    Args:
        model: a transformers MoE model; its decoder layers may be on the meta device when
            ``store`` materializes them.
        cfg: the :class:`~moecore.config.CompressionConfig`.
        store: a :class:`LayerStore`.
        seqs: calibration sequences (token ids) or ``None`` (weight-space init, no forward).
        device: the compute device.
        scratch: the folder of a Gram stack too large for host memory (:func:`moecore.fitting.gram_stack`).
    """

    def __init__(self, model: nn.Module, cfg: CompressionConfig, store: LayerStore,
                 seqs: list[torch.Tensor] | None, device, batch_size: int = 8, progress: bool = True, scratch=None):
        self.model, self.cfg, self.store, self.device = model, cfg, store, torch.device(device)
        self.scratch = scratch
        self.stack_path, self.stack, self.by_layer = experts_by_layer(model)
        check_top_k(model, self.by_layer, self.stack)
        self.batches = make_batches(seqs, batch_size) if seqs else []
        self.progress = progress
        self.calls = None
        self.timings: list[dict[str, Any]] = []
        self.recovery: list[dict[str, Any]] = []  # block recovery reports, {"path", **train_block's}
        self.order = [(i, rel) for i in sorted(self.by_layer) for rel, _ in self.by_layer[i]]

    # ------------------------------------------------------------------ set-up
    def shapes(self) -> list:
        return [s for i in sorted(self.by_layer) for rel, layout in self.by_layer[i]
                for s in projection_shapes(f"{self.stack_path}.{i}.{rel}", self.stack[i].get_submodule(rel), layout)]

    def first_inputs(self) -> list[torch.Tensor] | None:
        """Capture every layer's call arguments; return the first layer's inputs per batch."""
        if not self.batches:
            return None
        hidden, self.calls = capture_layer_inputs(self.model, self.stack, self.batches, self.device)
        return hidden

    def solve(self, hidden: list[torch.Tensor] | None) -> dict:
        """Ranks for every projection (greedy: an extra pass over the layers for the spectra)."""
        gains = None
        if self.cfg.rank is None and self.cfg.allocation == "greedy":
            gains = {}
            for i in progress_bar(range(len(self.stack)), desc="moecore: spectra (greedy)", unit="layer",
                                  enabled=self.progress):
                layer = self.stack[i]
                self.store.load(i, layer)
                originals = self._stand_ins(i, layer)
                saved = widen_layer(layer, self.device)
                inputs, outs = self._calibrate(i, layer, hidden, keep_outputs=True,
                                               float_dtype=torch.float32 if saved else None)
                for rel, layout in self.by_layer.get(i, []):
                    gains.update(rank_gains(f"{self.stack_path}.{i}.{rel}", layer.get_submodule(rel), layout, self.cfg,
                                            inputs.get(rel), self.device, self.scratch))
                hidden = outs
                inputs = None
                for rel, module in originals.items():
                    replace_module(layer, rel, module)
                restore_layer(layer, saved)
                self.store.release(i, layer)
                release_memory(self.device)
        return solve_ranks(self.shapes(), self.cfg, gains)

    # ------------------------------------------------------------------ per layer
    def _stand_ins(self, i: int, layer: nn.Module) -> dict[str, nn.Module]:
        """Put a :class:`~moecore.expert_source.SourcedExperts` (weights from the store, a chunk
        of experts at a time) in place of each routed experts module of layer ``i``, before the
        layer is widened: the experts are cast one at a time where they are used.  Returns the
        modules replaced."""
        originals = {}
        for rel, layout in self.by_layer.get(i, []):
            if layout.call == "routed":
                module = layer.get_submodule(rel)
                source = self.store.experts(i, rel, layout, module)
                originals[rel] = replace_module(layer, rel, SourcedExperts(source, layout, module))
        return originals

    @torch.no_grad()
    def _calibrate(self, i: int, layer: nn.Module, hidden, keep_outputs: bool, float_dtype=None,
                   expert_outputs: bool = False):
        """Run the original layer on ``hidden`` (in ``float_dtype`` if the layer was widened);
        return its experts' routed inputs (with ``expert_outputs``, their outputs too) and
        (if ``keep_outputs``) the layer's outputs per batch."""
        if hidden is None:
            return {}, None
        mods = self.by_layer.get(i, [])
        hooks, outs = calibrate_layer(layer, mods, hidden, self.calls[i], self.device, keep_outputs,
                                      float_dtype=float_dtype, expert_outputs=expert_outputs)
        inputs = {}
        for rel, layout in mods:
            e = layout.split(layer.get_submodule(rel))["gate"].shape[0]
            inputs[rel] = hooks[rel].inputs(e, self.cfg.calib_weighting)
        return inputs, outs

    def _targets(self, layout: ExpertsLayout, original: nn.Module, inputs: RoutedInputs) -> torch.Tensor:
        """``original``'s block output ``(N, H)`` on the calibration rows, on the compute device:
        what recovery trains to."""
        if inputs.outputs is not None:  # computed by the calibration forward
            return inputs.outputs
        dev = self.device
        return block_targets(original, layout, inputs.x.to(dev), inputs.top_k_index.to(dev),
                             inputs.top_k_weights.to(dev))

    def _recover(self, path: str, layout: ExpertsLayout, y: torch.Tensor, new: nn.Module,
                 inputs: RoutedInputs, seed: int) -> dict[str, Any]:
        """Train ``new``'s factors to the original block's output ``y (N, H)`` on the calibration
        rows (:func:`moecore.block_recovery.train_block`) on the compute device; its report."""
        cfg, dev = self.cfg, self.device
        x, idx, w = inputs.x.to(dev), inputs.top_k_index.to(dev), inputs.top_k_weights.to(dev)  # (N, H), (N, k) x2
        held = heldout_rows(sequence_ids(inputs.rows_per_call, [tuple(b.shape) for b in self.batches])).to(dev)
        return train_block(new, layout, x, idx, w, y, held, steps=cfg.recover_steps, lr=cfg.recover_lr,
                           batch_tokens=cfg.recover_batch_tokens, train_core=cfg.recover_train_core, seed=seed,
                           where=path, memory_gb=cfg.recover_memory_gb)

    @torch.no_grad()
    def _propagate(self, i: int, layer: nn.Module, hidden, float_dtype=None) -> list[torch.Tensor]:
        return [run_layer(layer, h, self.calls[i][b], self.device, float_dtype).to(h.device)
                for b, h in enumerate(hidden)]

    @torch.no_grad()
    def run(self, ranks: dict, hidden: list[torch.Tensor] | None, start: int = 0) -> None:
        """Compress layers ``start ...`` (``hidden``: the inputs of layer ``start``)."""
        original = self.cfg.propagate == "original"
        bar = progress_bar(range(start, len(self.stack)), desc="moecore: compressing", unit="layer",
                           enabled=self.progress, initial=start, total=len(self.stack))
        for i in bar:
            t0 = time.perf_counter()
            layer = self.stack[i]
            self.store.load(i, layer)
            stored = {rel: layer.get_submodule(rel).source.dtype for rel in self._stand_ins(i, layer)}
            saved = widen_layer(layer, self.device)  # on a CPU: a half-precision layer computed in float32
            fdt = torch.float32 if saved else None
            t1 = time.perf_counter()
            mods = self.by_layer.get(i, [])
            wants_targets = bool(self.cfg.recover_steps and self.cfg.quant is None)
            inputs, outs = self._calibrate(i, layer, hidden, keep_outputs=original or not mods, float_dtype=fdt,
                                           expert_outputs=wants_targets)
            t2 = time.perf_counter()
            recover_s = 0.0
            for rel, layout in mods:
                path = f"{self.stack_path}.{i}.{rel}"
                seed = self.cfg.seed + self.order.index((i, rel))
                recover = self.cfg.recover_steps and self.cfg.quant is None and inputs.get(rel) is not None
                tr = time.perf_counter()
                y = self._targets(layout, layer.get_submodule(rel), inputs[rel]) if recover else None
                recover_s += time.perf_counter() - tr  # part of recovery (from the calibration forward, if routed)
                narrow_module(layer, rel, saved)  # experts widened with their layer (not routed): back for the fit
                # a module neither trained nor run in this layer's float32 copy is built in the
                # checkpoint's dtype at once (restore_layer's cast, done early: half the bytes
                # for its finished projections during the fit)
                idle = saved and not recover and (outs is not None or hidden is None) and self.cfg.quant is None
                new = fit_experts(layer.get_submodule(rel), layout, self.cfg, {p: ranks[(path, p)] for p in PROJECTIONS},
                                  inputs.get(rel), self.device, seed, dtype=fdt, scratch=self.scratch,
                                  store_dtype=stored.get(rel) if idle else None)
                replace_module(layer, rel, new)  # the original experts freed before recovery's Adam steps
                if recover:
                    tr = time.perf_counter()
                    new.report["recovery"] = self._recover(path, layout, y, new, inputs[rel], seed)
                    y = None
                    self.recovery.append({"path": path, **new.report["recovery"]})
                    recover_s += time.perf_counter() - tr
            inputs = None
            t3 = time.perf_counter()
            if self.progress:
                bar.set_postfix(progress_postfix(layer, self.device, t3 - t2), refresh=False)
            if hidden is not None:
                hidden = outs if outs is not None else self._propagate(i, layer, hidden, fdt)
            restore_layer(layer, saved, {rel: stored.get(rel) for rel, _ in mods})  # in the checkpoint's dtypes
            t4 = time.perf_counter()
            self.store.done(i, layer, hidden)
            release_memory(self.device)
            t5 = time.perf_counter()
            self.timings.append({"layer": i, "load_s": t1 - t0, "calibrate_s": t2 - t1, "fit_s": t3 - t2 - recover_s,
                                 "recover_s": recover_s,
                                 "propagate_s": t4 - t3, "write_s": t5 - t4, "resident_bytes": resident_bytes()})
            bar.refresh()
