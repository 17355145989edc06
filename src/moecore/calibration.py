"""Calibration activations for the layer-by-layer engine (:mod:`moecore.engine`).

Two jobs, both per decoder layer and never for the whole model at once:

* :func:`capture_layer_inputs` runs the model's embedding (and mask / rotary set-up) with
  every decoder layer replaced by a recorder, so it gets the first layer's input hidden
  states and every layer's keyword arguments (masks differ per layer type, e.g. GPT-OSS's
  sliding window) without running any layer.
* :class:`RoutedInputs` holds what reached one experts module while its *original* layer ran
  on the current calibration activations (inputs, top-k indices and weights) and turns it
  into per-expert Gram matrices, one expert at a time, accumulated in float64 on the compute
  device and stored wherever the caller wants (host memory, float64 or float32).

A token's contribution to an expert's Gram is weighted by its squared routing weight
(``calib_weighting="routing"``): the expert's output is scaled by that weight, so its output
error is ``Σ_t w_t² ‖Δ x_t‖²``.  Experts that received few calibration tokens are shrunk
toward the layer-wide Gram: ``G̃_i = G_i + κ·Ḡ`` with ``Ḡ = Σ_j G_j / Σ_j n_j`` (the Gram of an
average routed token) and ``κ = calib_prior_tokens``, so a rarely used expert is fitted to the
layer's input distribution instead of to a handful of rows.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from .errors import UnsupportedModelError
from .expert_source import SourcedExperts, group_pairs
from .families import FUSED, ExpertsLayout
from .surgery import set_tensor

_F64 = torch.float64


class _Stop(Exception):
    """Raised by the last recorder: nothing after the decoder layers needs to run."""


class _Recorder(nn.Module):
    """Stands in for decoder layer ``index`` during :func:`capture_layer_inputs`."""

    def __init__(self, index: int, sink: list, last: bool):
        super().__init__()
        self.index, self.sink, self.last = index, sink, last

    def forward(self, hidden_states, *args, **kwargs):
        self.sink.append((self.index, hidden_states, args, kwargs))
        if self.last:
            raise _Stop
        return hidden_states


def to_device(obj: Any, device, float_dtype: torch.dtype | None = None) -> Any:
    """``obj`` with every tensor inside (tuples, lists, dicts) moved to ``device`` (``None``:
    where it is) and, with ``float_dtype``, its floating-point tensors cast to it."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device=device, dtype=float_dtype if float_dtype and obj.is_floating_point() else None)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device, float_dtype) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device, float_dtype) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device, float_dtype) for k, v in obj.items()}
    return obj


#: the half-precision dtypes a layer is widened from on a CPU (:func:`widen_layer`)
HALF = (torch.bfloat16, torch.float16)


def widen_layer(layer: nn.Module, device) -> dict[str, torch.dtype]:
    """On a CPU, cast ``layer``'s bfloat16 / float16 parameters and buffers to float32 in place
    and return ``{name: dtype}`` to restore them (:func:`restore_layer`); elsewhere nothing.

    Without bf16 instructions a CPU multiplies bfloat16 matrices about 80x slower than
    float32 (0.97 against 79 GFLOP/s on one core of the CI machine, RESULTS §7c): the engine's
    calibration forward, recovery targets and block errors would spend most of a layer's time
    there.  The layer's float32 copy costs its size once more in host memory."""
    if torch.device(device).type != "cpu":
        return {}
    saved = {}
    for name, t in list(layer.named_parameters()) + list(layer.named_buffers()):
        if t.dtype in HALF and t.device.type != "meta":
            saved[name] = t.dtype
            set_tensor(layer, name, t.detach().float())
    return saved


def narrow_module(layer: nn.Module, rel: str, saved: dict[str, torch.dtype]) -> None:
    """Cast the tensors of submodule ``rel`` that :func:`widen_layer` widened back to their
    stored dtypes (exact: a half-precision value survives float32), keeping ``saved`` as it is.

    The engine does this to an experts module once its float32 work is done (calibration
    forward, recovery targets): the fit reads the experts a chunk at a time in its own
    precision, so they need not stay widened (2.8 GB of a Mixtral-8x7B layer)."""
    names = dict(layer.named_parameters())
    names.update(layer.named_buffers())
    for name, dtype in saved.items():
        if name.startswith(rel + ".") and name in names:
            set_tensor(layer, name, names[name].detach().to(dtype))


def restore_layer(layer: nn.Module, saved: dict[str, torch.dtype],
                  replaced: dict[str, torch.dtype | None] | None = None) -> None:
    """Undo :func:`widen_layer`: the tensors ``saved`` names back to their dtypes, and each
    submodule at a path in ``replaced`` (swapped in since, e.g. compressed experts) cast to
    the dtype given there (``None``: the dtype the widened tensors under that path had).
    Nothing when the layer was not widened (``saved`` empty)."""
    if not saved:
        return
    names = dict(layer.named_parameters())
    names.update(layer.named_buffers())
    for name, dtype in saved.items():
        if name in names:
            set_tensor(layer, name, names[name].detach().to(dtype))
    for rel, dtype in (replaced or {}).items():
        dtype = dtype or next((d for n, d in saved.items() if n.startswith(rel + ".")), None)
        if dtype is not None:
            layer.get_submodule(rel).to(dtype)


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, layers: nn.ModuleList, batches: list[torch.Tensor], device,
                         store_device="cpu") -> tuple[list[torch.Tensor], list[list[tuple[tuple, dict]]]]:
    """Inputs of the first decoder layer per batch, ``[(B, L, H)]`` on ``store_device``, and
    every layer's extra arguments ``calls[layer][batch] = (args, kwargs)``.

    The decoder layers in ``layers`` are swapped for recorders for the duration of the call
    (their weights may be on the meta device); only the embedding and what the model computes
    before its first layer run, on ``device``.
    """
    originals = list(layers)
    sink: list = []
    for i in range(len(originals)):
        layers[i] = _Recorder(i, sink, last=i == len(originals) - 1)
    hidden: list[torch.Tensor] = []
    calls: list[list[tuple[tuple, dict]]] = [[] for _ in originals]
    try:
        for ids in batches:
            sink.clear()
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _Stop:
                pass
            for index, h, args, kwargs in sink:
                if index == 0:
                    hidden.append(h.detach().to(store_device))
                calls[index].append((args, kwargs))
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    if any(len(c) != len(batches) for c in calls):
        raise UnsupportedModelError("the model did not call every decoder layer once per batch (a forward that "
                                    "skips or repeats layers cannot be calibrated layer by layer)")
    return hidden, calls


def run_layer(layer: nn.Module, hidden: torch.Tensor, call: tuple[tuple, dict], device,
              float_dtype: torch.dtype | None = None) -> torch.Tensor:
    """One decoder layer on one batch: ``(B, L, H) -> (B, L, H)`` (a tuple output's first item);
    with ``float_dtype`` the inputs and floating call arguments are cast to it."""
    args, kwargs = to_device(call, device, float_dtype)
    out = layer(hidden.to(device=device, dtype=float_dtype), *args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _run_batches(layer: nn.Module, hidden: list[torch.Tensor], calls, device, float_dtype, keep: bool,
                 hooks: dict[nn.Module, Callable]) -> list[torch.Tensor] | None:
    """Run ``layer`` on every batch with forward pre-hooks ``{module: hook(module, args, kwargs)}``
    (a hook may raise ``_Stop``: that batch stops there); the outputs per batch if ``keep``."""
    handles = [m.register_forward_pre_hook(h, with_kwargs=True) for m, h in hooks.items()]
    outs = [] if keep else None
    try:
        for b, h in enumerate(hidden):
            try:
                y = run_layer(layer, h, calls[b], device, float_dtype)
            except _Stop:
                continue
            if keep:
                outs.append(y.to(h.device))
    finally:
        for handle in handles:
            handle.remove()
    return outs


def _stopping(hook: "ExpertsInputHook") -> Callable:
    def pre(module, args, kwargs):
        hook(module, args, kwargs)
        raise _Stop
    return pre


@torch.no_grad()
def calibrate_layer(layer: nn.Module, mods: list[tuple[str, ExpertsLayout]], hidden: list[torch.Tensor],
                    calls: list[tuple[tuple, dict]], device, keep_outputs: bool, store_device="cpu",
                    float_dtype: torch.dtype | None = None, expert_outputs: bool = False,
                    ) -> tuple[dict[str, "ExpertsInputHook"], list[torch.Tensor] | None]:
    """Run ``layer`` on every batch of ``hidden`` (``[(B, L, H)]``, call arguments ``calls[b]``)
    with an :class:`ExpertsInputHook` on each experts module ``mods = [(path in the layer,
    layout)]``; return the hooks (what reached each module, per call) and, if
    ``keep_outputs``, the layer's outputs per batch (on each batch's device).
    ``float_dtype``: as :func:`run_layer`'s (a widened layer).

    When every module is a :class:`~moecore.expert_source.SourcedExperts`, each one's inputs
    are captured with the layer stopped there, its output on every row is computed once
    (the weights read once, a chunk of experts at a time; kept as the hook's ``outputs``
    ``(N, H)`` on ``device`` when ``expert_outputs``) and replayed, batch by batch, to the
    passes that follow.  Otherwise the modules run per batch.  Without ``keep_outputs`` the
    forward stops at the (single, or last sourced) experts module: attention and router only."""
    modules = [layer.get_submodule(rel) for rel, _ in mods]
    hooks = {rel: ExpertsInputHook(store_device=store_device, layout=layout) for rel, layout in mods}
    if not all(isinstance(m, SourcedExperts) for m in modules):
        if not keep_outputs and len(mods) == 1:
            _run_batches(layer, hidden, calls, device, float_dtype, False, {modules[0]: _stopping(hooks[mods[0][0]])})
            return hooks, None
        pre = {m: hooks[rel] for m, (rel, _) in zip(modules, mods)}  # a hook is called as (module, args, kwargs)
        return hooks, _run_batches(layer, hidden, calls, device, float_dtype, keep_outputs, pre)
    replays: list[tuple[SourcedExperts, list[torch.Tensor]]] = []
    for j, (m, (rel, _)) in enumerate(zip(modules, mods)):
        for earlier, ys in replays:
            earlier.replay = list(ys)
        _run_batches(layer, hidden, calls, device, float_dtype, False, {m: _stopping(hooks[rel])})
        if not keep_outputs and not expert_outputs and j == len(mods) - 1:
            break
        x, idx, w = hooks[rel].rows()
        y = m.outputs(x.to(device), idx.to(device), w.to(device))  # (N, H)
        if expert_outputs:
            hooks[rel].outputs = y
        replays.append((m, list(y.split(hooks[rel].rows_per_call()))))
    outs = None
    if keep_outputs:
        for m, ys in replays:
            m.replay = list(ys)
        outs = _run_batches(layer, hidden, calls, device, float_dtype, True, {})
    for m in modules:
        m.replay = None
    return hooks, outs


class ExpertsInputHook:
    """Forward pre-hook on an experts module that keeps what reaches it (on the host), as
    ``(x (N, H), top_k_index (N, k), top_k_weights (N, k))`` whatever the layout's call
    convention (:meth:`~moecore.families.ExpertsLayout.routed_call`; Llama-4's dense,
    router-prescaled call keeps only the rows of routed tokens, with weight 1)."""

    def __init__(self, store_device="cpu", layout: ExpertsLayout = FUSED):
        self.store_device = store_device
        self.layout = layout
        self.got: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.per_call: list[int] = []  # rows each call gave
        self.outputs: torch.Tensor | None = None  # (N, H): the experts' output, when calibrate_layer computed it

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        names = ("hidden_states", "top_k_index", "top_k_weights")
        vals = list(args) + [kwargs.get(n) for n in names[len(args):]]
        x, idx, wts = self.layout.routed_call(*(v.detach() if v is not None else None for v in vals[:3]),
                                              module.num_experts, skip_unrouted=True)
        self.got.append((x.to(self.store_device), idx.to(self.store_device), wts.to(self.store_device)))
        self.per_call.append(x.shape[0])

    def rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Everything collected so far: ``(x (N, H), top_k_index (N, k), top_k_weights (N, k))``
        (concatenated once: the per-call pieces are replaced by the whole)."""
        if len(self.got) != 1:  # none: torch.cat's error, as before
            self.got = [tuple(torch.cat([g[j] for g in self.got]) for j in range(3))]
        return self.got[0]

    def rows_per_call(self) -> list[int]:
        """Rows each call gave (one call per calibration batch)."""
        return list(self.per_call)

    def inputs(self, num_experts: int, weighting: str) -> "RoutedInputs":
        """Everything collected so far as one :class:`RoutedInputs`."""
        x, idx, w = self.rows()
        out = RoutedInputs(x, idx, w, num_experts, weighting, rows_per_call=self.rows_per_call())
        out.outputs = self.outputs
        return out


class RoutedInputs:
    """Calibration inputs of one experts module: ``x (T, H)``, ``top_k_index (T, k)``,
    ``top_k_weights (T, k)`` (kept as given, for block recovery), with the routed
    (token, expert) pairs sorted by expert; ``rows_per_call[b]``: the rows call ``b`` gave."""

    def __init__(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, num_experts: int, weighting: str,
                 rows_per_call: list[int] | None = None):
        self.top_k_index, self.top_k_weights = idx, weights
        self.rows_per_call = rows_per_call if rows_per_call is not None else [x.shape[0]]
        k = idx.shape[1]
        pairs, counts = group_pairs(idx, num_experts)  # (S,) routed pairs, by expert
        self.x, self.num_experts, self.weighting = x, num_experts, weighting
        self.outputs: torch.Tensor | None = None  # (T, H): the original experts' output on x, when known
        self.expert, self.token, self.weight = idx.reshape(-1)[pairs], pairs // k, weights.reshape(-1)[pairs]  # (S,)
        self.counts = counts.to(_F64)  # (E,)
        ends = torch.cumsum(self.counts.long(), 0)
        self.ranges = list(zip((ends - self.counts.long()).tolist(), ends.tolist()))

    def _rows(self, e: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
        a, b = self.ranges[e]
        x = self.x[self.token[a:b]].to(device)  # (n_e, H), model dtype
        rw = self.weight[a:b].to(device=device, dtype=_F64)[:, None] if self.weighting == "routing" else None
        return x, rw

    @torch.no_grad()
    def grams(self, kind: str, store: torch.Tensor, device, views: dict | None = None, layout: ExpertsLayout | None = None,
              act: Callable | None = None, prior_tokens: float = 0.0) -> torch.Tensor:
        """Fill ``store (E, d, d)`` (any device/dtype) with every expert's Gram and return it.

        ``kind="in"``: the experts' input ``x`` (gate/up projections, d = H).  ``kind="mid"``:
        ``act(gate)·up`` computed with the ORIGINAL weights ``views`` (down projection, d = F).
        Each Gram is accumulated in float64 on ``device``; then ``κ·Ḡ`` is added
        (``κ = prior_tokens``, see the module docstring).
        """
        d = store.shape[-1]
        total = torch.zeros(d, d, dtype=_F64, device=device)
        for e in range(self.num_experts):
            x, rw = self._rows(e, device)
            if kind == "mid":
                wd = dict(device=device, dtype=x.dtype)  # one expert widened at a time (narrow_module)
                gate, up = x @ views["gate"][e].to(**wd).mT, x @ views["up"][e].to(**wd).mT  # (n_e, F)
                if layout.has_bias:
                    bg, bu = layout.split_bias(views["bias_gate_up"][e].to(**wd))
                    gate, up = gate + bg, up + bu
                x = act(gate, up)
            x = x.to(_F64)
            if rw is not None:
                x = x * rw
            g = x.mT @ x  # (d, d)
            total += g
            store[e] = g.to(device=store.device, dtype=store.dtype)
        n = float(self.counts.sum())
        if prior_tokens > 0 and n > 0:
            prior = (prior_tokens / n) * total  # κ·Ḡ
            for e in range(self.num_experts):
                store[e] += prior.to(device=store.device, dtype=store.dtype)
        return store
