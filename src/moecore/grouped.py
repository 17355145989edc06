"""Grouped-GEMM maths of the compressed experts forward, free of host synchronization.

- :class:`Routing`: routed ``(token, expert)`` pairs sorted by expert, with ``int32``
  cumulative offsets from ``histc`` + ``cumsum`` (no ``.tolist()``, ``int(tensor)``,
  ``bool(tensor)``, no data-dependent shapes), so the forward can be traced by
  ``torch.compile(fullgraph=True)`` and captured in a CUDA graph.
- :func:`grouped_linear`: per group ``x[rows of g] @ w[g]ᵀ`` with
  ``torch.nn.functional.grouped_mm`` (via transformers' own dispatcher, which knows the
  device / dtype / compile rules) and transformers' registered per-group fallback op where
  the native kernel can't take the operands (float64, unaligned strides) and for CPU decode.
- the operand helpers every form builds its grouped-GEMM weights with (the forms, in
  :mod:`moecore.forms`, rearrange their stored cores and factors once into such weights):
  :func:`padded_rank` / :func:`pad_rank` zero-pad ranks to 16-byte rows (the kernels' stride
  rule; zero padding adds exact zeros, so results are unchanged), every weight is
  ``(G, N, K)`` like ``nn.Linear``, stored ``K``-major on CPU (:func:`cpu_layout`), a core
  applied to every token is laid out by :func:`cpu_core` and multiplied by
  :func:`dense_linear`, which picks the CPU GEMM formulation by row count.

Nothing here knows a form: each form's operands and forward are in its own module of
:mod:`moecore.forms`.

Invalid expert indices (negative or ``>= E``, e.g. expert-parallel sentinels) are clamped
into ``[0, E)`` with weight 0 and masked out with ``torch.where``: every GEMM row is a real,
initialized computation (no uninitialized tail rows) at the cost of computing those pairs.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from transformers.integrations import moe as _tf_moe  # registers torch.ops.transformers.grouped_mm_fallback

_NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

#: CPU: a per-token core (the delta form's) of at least this many bytes is used as stored (``nn.Linear`` layout, no
#: copy); a smaller one is copied ``K``-major.  Measured (1 thread, fresh allocations per
#: round, guest huge pages; RESULTS §6): at 6-12 MiB (Qwen3-30B-A3B) the stored layout with
#: :func:`dense_linear` takes 1.2-1.5x the ``K``-major copy's time at 8 rows and 0.88-1.48x
#: at 32-64 (these GEMMs are a few percent of that forward); at 56 MiB (DeepSeek-V3) and
#: 224 MiB (Mixtral-8x7B) the stored layout is faster at every row count measured, 1-256:
#: with :func:`dense_linear` 0.48-0.91x the ``K``-major time up to 32 rows and 0.64-0.90x
#: from 64 (Mixtral gate at 64 tokens: 0.71x).  With 4 KiB pages the direction is the same.
CPU_LINEAR_CORE_BYTES = 16 << 20
#: CPU, ``nn.Linear``-layout weight: up to this many rows :func:`dense_linear` computes
#: ``(W xᵀ)ᵀ``, above it ``x Wᵀ``.  Measured on the large cores: ``(W xᵀ)ᵀ`` takes
#: 0.42-0.67x the time of ``x Wᵀ`` at 8 rows and 0.66-0.74x at 32, but 1.02-1.08x at 64.
CPU_WXT_MAX_ROWS = 32


class Routing:
    """Routed pairs of one forward, sorted by expert (stable: token order within an expert).

    Attributes (``S = T·k``): ``expert (S,)`` clamped expert id, ``token (S,)`` source token,
    ``order (S,)`` flat ``t·k + j`` index of each sorted pair, ``valid (S, 1)`` bool,
    ``weight (S, 1)`` routing weight (0 where invalid), ``offs (E,)`` int32 cumulative pair
    counts per expert, ``offs2 (2E,)`` the offsets of the gate-then-up stacked ``(2S, ·)``
    layout (gate rows ``[0, S)``, up rows ``[S, 2S)``).
    """

    def __init__(self, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int, dtype: torch.dtype):
        t, k = top_k_index.shape
        idx = top_k_index.reshape(-1)  # (S,)
        valid = (idx >= 0) & (idx < num_experts)  # (S,)
        self.expert, self.order = torch.sort(idx.clamp(0, num_experts - 1), stable=True)  # (S,) each
        self.token = self.order // k  # (S,)
        self.valid = valid[self.order].unsqueeze(-1)  # (S, 1)
        w = top_k_weights.reshape(-1)[self.order].to(dtype).unsqueeze(-1)  # (S, 1)
        self.weight = torch.where(self.valid, w, torch.zeros_like(w))
        # histc: static output shape (bincount's depends on the data); float input on CPU/MPS,
        # int on CUDA (the rules of transformers' grouped_mm path, deterministic-mode safe)
        ids = self.expert.float() if idx.device.type in ("cpu", "mps") else self.expert.int()
        counts = torch.histc(ids, bins=num_experts, min=0, max=num_experts - 1)  # (E,)
        self.offs = torch.cumsum(counts, 0, dtype=torch.int32)  # (E,)
        self.num_tokens, self.top_k, self.num_pairs = t, k, t * k
        self.offs2 = torch.cat([self.offs, self.offs + self.num_pairs])  # (2E,)

    def to_tokens(self, y: torch.Tensor) -> torch.Tensor:
        """``(S, d)`` per-pair rows in sorted order -> ``(T, d)`` summed over each token's
        pairs (invalid pairs masked to 0).  Deterministic: a permutation and a ``sum`` over
        ``k``, no atomics.  On CPU one ``index_add_`` into ``(T, d)`` (sequential there, so
        deterministic; no ``(S, d)`` temporaries: 4-8x faster at ``S·d`` = 128·14336 to
        1024·14336), accumulated in float32 for 16-bit ``y`` (as the ``sum`` does), with the
        mask only where a pair is invalid (eager; always under compile)."""
        if y.device.type == "cpu":
            if torch.compiler.is_compiling() or not self._all_valid():
                y = torch.where(self.valid, y, 0.0)  # (S, d)
            acc = torch.float32 if y.element_size() < 4 else y.dtype
            out = y.new_zeros(self.num_tokens, y.shape[1], dtype=acc).index_add_(0, self.token, y.to(acc))  # (T, d)
            return out.to(y.dtype)
        y = torch.where(self.valid, y, torch.zeros_like(y))  # (S, d)
        flat = torch.empty_like(y).index_copy_(0, self.order, y)  # (S, d) in t·k + j order
        return flat.view(self.num_tokens, self.top_k, y.shape[1]).sum(1)  # (T, d)

    def _all_valid(self) -> bool:
        """Whether every pair has a real expert (CPU eager only: reads the mask on the host)."""
        if not hasattr(self, "_valid_all"):
            self._valid_all = bool(self.valid.all())
        return self._valid_all

    def stack2(self, z: torch.Tensor) -> torch.Tensor:
        """``(S, 2r)`` [gate | up] columns -> ``(2S, r)`` gate rows then up rows (``offs2`` layout)."""
        s, r = z.shape[0], z.shape[1] // 2
        return z.view(s, 2, r).transpose(0, 1).reshape(2 * s, r)


def _native_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``grouped_mm`` can take ``x (S, K)`` and ``w (G, N, K)``: supported dtype and
    16-byte aligned rows of ``x``, ``w`` and the ``(S, N)`` output."""
    if w.dtype not in _NATIVE_DTYPES or not hasattr(F, "grouped_mm"):
        return False
    k, n, el = w.shape[-1], w.shape[-2], w.element_size()
    return (k * el) % 16 == 0 and (n * el) % 16 == 0 and x.is_contiguous() and (w.is_contiguous() or w.mT.is_contiguous())


def grouped_linear(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Per group ``g``: rows ``[offs[g-1], offs[g])`` of ``x (S, K)`` times ``w[g]ᵀ``, with
    ``w (G, N, K)`` (``nn.Linear`` convention) and ``offs (G,)`` int32 with ``offs[-1] == S``
    -> ``(S, N)`` in ``w``'s dtype.

    CPU, eager, fewer rows than groups (decode): transformers' fallback op, which skips
    empty groups (the CPU ``grouped_mm`` kernel runs one ``mm`` per group, empty or not;
    reading ``offs`` on the host costs nothing on CPU)."""
    cpu_decode = x.device.type == "cpu" and x.shape[0] < w.shape[0] and not torch.compiler.is_compiling()
    if _native_ok(x, w) and not cpu_decode:  # transformers' dispatcher: native kernel, or its fallback
        return _tf_moe._grouped_mm(x, w.mT, offs=offs)  # (e.g. non-bf16 under torch.compile)
    return torch.ops.transformers.grouped_mm_fallback(x.to(w.dtype).contiguous(), w.mT, offs=offs)


def dense_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x (M, K) @ w (N, K)ᵀ -> (M, N)``, a core applied to every row.  CPU with ``w`` stored
    in ``nn.Linear`` layout and at most :data:`CPU_WXT_MAX_ROWS` rows: ``(w xᵀ)ᵀ`` (a
    transposed view), which the CPU GEMM runs faster there; otherwise ``x wᵀ``.  The choice
    depends on shapes and strides only (no data), so it traces under ``torch.compile``."""
    if x.device.type == "cpu" and w.is_contiguous() and x.shape[0] <= CPU_WXT_MAX_ROWS:
        return (w @ x.mT).mT
    return x @ w.mT


# ---------------------------------------------------------------------- fused operands
def padded_rank(r: int, dtype: torch.dtype) -> int:
    """``r`` rounded up to a whole number of 16-byte rows of ``dtype`` (at least one row)."""
    a = max(1, 16 // torch.empty(0, dtype=dtype).element_size())
    return max(a, -(-r // a) * a)


def pad_rank(t: torch.Tensor, r: int) -> torch.Tensor:
    """``(E, d, s) -> (E, d, r)``: zero columns appended to the rank axis."""
    return F.pad(t, (0, r - t.shape[-1]))


def cpu_core(c: torch.Tensor) -> torch.Tensor:
    """A core applied once per token, ``(N, K)``, for CPU :func:`dense_linear`: as stored when it has at least
    :data:`CPU_LINEAR_CORE_BYTES` (no copy), else a ``K``-major copy (same logical tensor)."""
    if c.numel() * c.element_size() >= CPU_LINEAR_CORE_BYTES:
        return c.contiguous()
    return c.mT.contiguous().mT


def padded_ranks(get: Callable[[str], torch.Tensor], ranks: Mapping[str, int]) -> tuple[int, int]:
    """Padded rank widths ``(gate and up (shared), down)`` for the stored dtype."""
    dt = get("core_gate").dtype
    return padded_rank(max(ranks["gate"], ranks["up"]), dt), padded_rank(ranks["down"], dt)


def cpu_layout(ops: dict[str, torch.Tensor], keep: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """On CPU, the same logical ``(…, N, K)`` operands stored ``K``-major (``(…, K, N)``
    contiguous): at decode sizes the CPU GEMM multiplies by a row-major ``(K, N)`` matrix up to
    ~1.9x faster (e.g. 16x4096 @ 4096x800).  ``keep``: operands left as they are (a form's
    cores, whose layout it chose by measurement: RESULTS §6); CUDA keeps ``nn.Linear``'s
    layout throughout, as transformers' own ``grouped_mm`` path does, and so do operands built
    with gradients (training builds them every step, and the copy and its gradient's copy back
    cost more there than the layout saves)."""
    training = torch.is_grad_enabled() and any(v.requires_grad for v in ops.values())
    if ops["core_down"].device.type != "cpu" or training:
        return ops  # training builds the operands per step: a copy there costs more than it saves
    return {k: v if k in keep else v.mT.contiguous().mT for k, v in ops.items()}


# ---------------------------------------------------------------------- shared by the forms' forwards
Activation = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def gate_up_bias(gate, up, route: Routing, bias: tuple[torch.Tensor, torch.Tensor] | None):
    """``gate``, ``up`` ``(S, F)`` plus each pair's expert biases (``bias`` = ``(E, F)`` each), or as they are."""
    if bias is None:
        return gate, up
    return gate + bias[0][route.expert], up + bias[1][route.expert]  # (E, F)[S] -> (S, F)
