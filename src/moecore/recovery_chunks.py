"""The experts of a compressed module a chunk at a time, for recovery of layers too large to
train or run at once (:func:`moecore.block_recovery.train_experts_in_chunks`).

All at once, recovery's trained tensors take :data:`TRAINED_BYTES` per padded factor element
(a DeepSeek-V3 layer at 25%: 123 GiB), and even running a ragged module pads every expert's
factors to the largest rank (11 GB of operands at that shape).  Here experts ``a:b`` become a
module of their own (:func:`chunk_module`: the form's :meth:`~moecore.forms.Form.training_slice`,
padded to the largest rank among them), run on their routed pairs (:func:`part_output`), and
are written back (:func:`write_chunk`).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .compressed_experts import CompressedExperts
from .families import is_compressed
from .forms import PROJECTIONS, Form, get_form

#: bytes per trained element: float32 value, gradient and Adam's two moments (16), and each
#: step's operands built from it with their gradients (8)
TRAINED_BYTES = 24
#: rows per forward of :func:`part_output`
ROWS = 4096


def trained_form(module: CompressedExperts) -> tuple[Form, Form]:
    """The module's form and the form its copies train in (:attr:`~moecore.forms.Form.training_form`)."""
    form = module.form_impl
    return form, get_form(form.training_form or form.name)


def expert_chunk(module: nn.Module, memory_gb: float | None) -> int | None:
    """Experts that recovery trains at once, or ``None`` for all of them as one module.  A chunk
    only for a compressed module in float storage whose training form has a factor stack per
    expert (:attr:`~moecore.forms.Form.per_expert_factors`) and whose trained factors (padded
    as the form trains them) take more than ``memory_gb`` GiB at :data:`TRAINED_BYTES` per element."""
    if memory_gb is None or not is_compressed(module) or module.quant is not None:
        return None
    form, trained_as = trained_form(module)
    if not trained_as.per_expert_factors:
        return None

    def shapes_only(name: str) -> torch.Tensor:  # float tensors on meta: the training form's shapes, no copy
        t = module.stored(name)
        return t.to("meta") if t.is_floating_point() else t
    per_expert = sum(math.prod(t.shape[1:]) for p in PROJECTIONS for t in form.to_training(shapes_only, p))
    chunk = max(1, int(memory_gb * (1 << 30)) // max(1, TRAINED_BYTES * per_expert))
    return chunk if chunk < module.num_experts else None


@torch.no_grad()
def chunk_module(module: CompressedExperts, a: int, b: int, dtype: torch.dtype) -> CompressedExperts:
    """Experts ``a:b`` of ``module`` as a module of their own, in its training form and ``dtype``:
    their factors (:meth:`~moecore.forms.Form.training_slice`), the cores and their biases (copies)."""
    form, trained_as = trained_form(module)
    layout = module.layout
    biases = {n: module.stored(n)[a:b] for n in ("bias_gate_up", "bias_down")} if layout.has_bias else None
    cores = {p: module.stored(form.core_name(p)) for p in PROJECTIONS}
    factors = {p: form.training_slice(module.stored, p, a, b) for p in PROJECTIONS}
    return CompressedExperts.from_factors(layout, trained_as.name, cores, factors, biases, act_fn=module.act_fn,
                                          dtype=dtype, device=cores["gate"].device)


@torch.no_grad()
def write_chunk(module: CompressedExperts, a: int, b: int, new: dict) -> None:
    """Experts ``a:b`` of the module's stored factors set from training-form factors ``new[p]``."""
    form = module.form_impl
    for p in PROJECTIONS:
        form.set_training_slice(module.stored, p, a, b, tuple(new[p]))
    module.clear_cache()


def rows_output(part: CompressedExperts, a: int, b: int, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
    """The routing-weighted output ``(n, H)`` in ``dtype`` of experts ``a:b`` (``part``,
    :func:`chunk_module`) on rows ``x (n, H)``, ``idx (n, k)``, ``w (n, k)``: only their pairs,
    computed in ``part``'s dtype and summed back to the rows (zero where a row has none).
    Differentiable: recovery's loss on a batch is built from it."""
    r, j = ((idx >= a) & (idx < b)).nonzero(as_tuple=True)  # the pairs with these experts
    out = torch.zeros(x.shape[0], x.shape[1], dtype=dtype, device=x.device)
    if not r.numel():
        return out
    dt = part.float_dtype
    y = part.routed(x[r].to(dt), (idx[r, j] - a)[:, None], w[r, j, None].to(dt))  # (pairs, H)
    return out.index_add(0, r, y.to(dtype))


@torch.no_grad()
def part_output(part: CompressedExperts, a: int, b: int, x: torch.Tensor, idx: torch.Tensor,
                w: torch.Tensor) -> torch.Tensor:
    """:func:`rows_output` in float32, :data:`ROWS` rows at a time, with ``part``'s operands
    built per call and freed, not kept with the module."""
    part.cache_operands = False
    out = torch.empty(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    for i in range(0, x.shape[0], ROWS):
        out[i:i + ROWS] = rows_output(part, a, b, x[i:i + ROWS], idx[i:i + ROWS], w[i:i + ROWS], torch.float32)
    return out
