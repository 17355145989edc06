"""Grouped-GEMM maths of the compressed experts forward, free of host synchronization.

- :class:`Routing`: routed ``(token, expert)`` pairs sorted by expert, with ``int32``
  cumulative offsets from ``histc`` + ``cumsum`` (no ``.tolist()``, ``int(tensor)``,
  ``bool(tensor)``, no data-dependent shapes), so the forward can be traced by
  ``torch.compile(fullgraph=True)`` and captured in a CUDA graph.
- :func:`grouped_linear`: per group ``x[rows of g] @ w[g]ᵀ`` with
  ``torch.nn.functional.grouped_mm`` (via transformers' own dispatcher, which knows the
  device / dtype / compile rules) and transformers' registered per-group fallback op where
  the native kernel can't take the operands (float64, unaligned strides) and for CPU decode.
- :func:`delta_operands` / :func:`wrapper_operands`: the stored cores and factors rearranged
  once into grouped-GEMM weights: gate and up concatenated along the rank axis (one grouped
  pass for both), ranks zero-padded to 16-byte rows (the kernels' stride rule), every weight
  ``(G, N, K)`` like ``nn.Linear`` (stored ``K``-major on CPU).  Zero padding adds exact
  zeros, so results are unchanged.  On CPU the delta form keeps its three cores apart
  (:func:`cpu_core`: large ones as stored, no copy) and :func:`dense_linear` picks the CPU
  GEMM formulation by row count.
- :func:`delta_forward` / :func:`wrapper_forward`: the two forms on those operands (the delta
  form has its own CPU path, :func:`_delta_forward_cpu`, chosen by measurement: RESULTS §6).

Which form uses which is decided by the form objects (:mod:`moecore.forms`); nothing here
branches on a form name.

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

#: CPU: a delta core of at least this many bytes is used as stored (``nn.Linear`` layout, no
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


def _pad(t: torch.Tensor, r: int) -> torch.Tensor:
    """``(E, d, s) -> (E, d, r)``: zero columns appended to the rank axis."""
    return F.pad(t, (0, r - t.shape[-1]))


def delta_operands(get: Callable[[str], torch.Tensor], ranks: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """Delta-form grouped-GEMM weights, all ``(G, N, K)`` (``K``-major on CPU), built from the
    stored tensors that ``get(name)`` returns.  Differentiable (``cat``/``pad``): built per
    call in training, gradients reach the stored parameters.

    ``s'`` = padded rank; ``g``/``u``/``d`` = gate/up/down:
    ``core_gu (2F, H)``, ``gu_in (E, 2s', H)`` = [B_gᵀ; B_uᵀ], ``gu_out (2E, F, s')`` = [A_g; A_u],
    ``core_down (H, F)``, ``down_in (E, s', F)`` = B_dᵀ, ``down_out (E, H, s')`` = A_d.
    On CPU the cores stay apart, ``core_gate``/``core_up (F, H)`` and ``core_down``, each
    :func:`cpu_core` (no ``core_gu``).
    """
    rg, rd = _padded_ranks(get, ranks)
    if get("core_gate").device.type == "cpu":
        ops = {f"core_{p}": cpu_core(get(f"core_{p}")) for p in ("gate", "up", "down")}
    else:
        ops = {"core_down": get("core_down").contiguous()}
        ops["core_gu"] = torch.cat([get("core_gate"), get("core_up")], 0)  # (2F, H)
    ops["gu_in"] = torch.cat([_pad(get(f"delta_b_{p}"), rg).mT for p in ("gate", "up")], 1).contiguous()
    ops["gu_out"] = torch.cat([_pad(get(f"delta_a_{p}"), rg) for p in ("gate", "up")], 0)  # (2E, F, s')
    ops["down_in"] = _pad(get("delta_b_down"), rd).mT.contiguous()  # (E, s', F)
    ops["down_out"] = _pad(get("delta_a_down"), rd).contiguous()  # (E, H, s')
    return _cpu_layout(ops, keep=("core_gate", "core_up", "core_down"))


def wrapper_operands(get: Callable[[str], torch.Tensor], ranks: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """Wrapper-form grouped-GEMM weights (as :func:`delta_operands`; ``r'`` = padded rank):
    ``gu_in_v (E, 2r', H)``, ``gu_in_u (2E, H, r')``, ``core_gu (2, F, H)``,
    ``gu_out_v (2E, r', F)``, ``gu_out_u (2E, F, r')``, ``down_in_v (E, r', F)``,
    ``down_in_u (E, F, r')``, ``core_down (H, F)``, ``down_out_v (E, r', H)``, ``down_out_u (E, H, r')``.
    """
    rg, rd = _padded_ranks(get, ranks)
    ops = {"core_down": get("core_down").contiguous()}
    ops["core_gu"] = torch.stack([get("core_gate"), get("core_up")], 0)  # (2, F, H)
    ops["gu_in_v"] = torch.cat([_pad(get(f"wrap_v_in_{p}"), rg).mT for p in ("gate", "up")], 1).contiguous()
    ops["gu_in_u"] = torch.cat([_pad(get(f"wrap_u_in_{p}"), rg) for p in ("gate", "up")], 0)  # (2E, H, r')
    ops["gu_out_v"] = torch.cat([_pad(get(f"wrap_v_out_{p}"), rg).mT for p in ("gate", "up")], 0).contiguous()
    ops["gu_out_u"] = torch.cat([_pad(get(f"wrap_u_out_{p}"), rg) for p in ("gate", "up")], 0)  # (2E, F, r')
    for side, name in (("in", "down_in"), ("out", "down_out")):
        ops[f"{name}_v"] = _pad(get(f"wrap_v_{side}_down"), rd).mT.contiguous()  # (E, r', d_side)
        ops[f"{name}_u"] = _pad(get(f"wrap_u_{side}_down"), rd).contiguous()  # (E, d_side, r')
    return _cpu_layout(ops, keep=("core_gu", "core_down"))


def cpu_core(c: torch.Tensor) -> torch.Tensor:
    """A delta core ``(N, K)`` for CPU :func:`dense_linear`: as stored when it has at least
    :data:`CPU_LINEAR_CORE_BYTES` (no copy), else a ``K``-major copy (same logical tensor)."""
    if c.numel() * c.element_size() >= CPU_LINEAR_CORE_BYTES:
        return c.contiguous()
    return c.mT.contiguous().mT


def _padded_ranks(get: Callable[[str], torch.Tensor], ranks: Mapping[str, int]) -> tuple[int, int]:
    """Padded rank widths ``(gate and up (shared), down)`` for the stored dtype."""
    dt = get("core_gate").dtype
    return padded_rank(max(ranks["gate"], ranks["up"]), dt), padded_rank(ranks["down"], dt)


def _cpu_layout(ops: dict[str, torch.Tensor], keep: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """On CPU, the same logical ``(…, N, K)`` operands stored ``K``-major (``(…, K, N)``
    contiguous): at decode sizes the CPU GEMM multiplies by a row-major ``(K, N)`` matrix up to
    ~1.9x faster (e.g. 16x4096 @ 4096x800).  The wrapper's cores (run per pair, large M) keep
    their layout, which A/B-measured faster there (RESULTS §6), and the delta form's cores are
    laid out by :func:`cpu_core`; CUDA keeps ``nn.Linear``'s layout throughout, as
    transformers' own ``grouped_mm`` path does.  ``keep``: operands left as they are."""
    if ops["core_down"].device.type != "cpu":
        return ops
    return {k: v if k in keep else v.mT.contiguous().mT for k, v in ops.items()}


# ---------------------------------------------------------------------- forwards
Activation = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _gate_up_bias(gate, up, route: Routing, bias: tuple[torch.Tensor, torch.Tensor] | None):
    if bias is None:
        return gate, up
    return gate + bias[0][route.expert], up + bias[1][route.expert]  # (E, F)[S] -> (S, F)


def delta_forward(x: torch.Tensor, route: Routing, ops: dict, act: Activation,
                  bias_gu: tuple | None = None, bias_down: torch.Tensor | None = None) -> torch.Tensor:
    """Delta form: cores once per token, per pair ``A_i (B_iᵀ ·)``.  ``x (T, H) -> (T, H)``;
    ``bias_gu`` = gate/up biases ``(E, F)`` each, ``bias_down (E, H)``."""
    if "core_gu" not in ops:  # CPU operands (delta_operands): the CPU path
        return _delta_forward_cpu(x, route, ops, act, bias_gu, bias_down)
    s, f = route.num_pairs, ops["core_down"].shape[1]
    xs = x[route.token]  # (S, H)
    core = x @ ops["core_gu"].mT  # (T, 2F): one dense GEMM per token for gate and up
    low = grouped_linear(route.stack2(grouped_linear(xs, ops["gu_in"], route.offs)), ops["gu_out"], route.offs2)
    c = core[route.token]  # (S, 2F)
    gate, up = _gate_up_bias(c[:, :f] + low[:s], c[:, f:] + low[s:], route, bias_gu)  # (S, F) each
    hw = route.weight * act(gate, up)  # (S, F), weighted: the down path is linear in h
    mixed = route.to_tokens(hw)  # (T, F) = Σ_pairs w h
    y = grouped_linear(grouped_linear(hw, ops["down_in"], route.offs), ops["down_out"], route.offs)  # (S, H)
    if bias_down is not None:
        y = y + route.weight * bias_down[route.expert]
    return mixed @ ops["core_down"].mT + route.to_tokens(y)  # one dense GEMM per token for down


def _delta_forward_cpu(x: torch.Tensor, route: Routing, ops: dict, act: Activation,
                       bias_gu: tuple | None = None, bias_down: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`delta_forward` on CPU operands, the same maths: gate, up and down cores each one
    :func:`dense_linear` per token (as stored when large: at Mixtral-8x7B, 64 tokens, the
    fused ``K``-major gate/up GEMM took 1.4x the time, and the whole forward about 1.5x that of
    commit 98aef90's, RESULTS §6), the per-pair core rows gathered per
    projection (no ``(S, 2F)`` gather and strided halves), and the result built in the
    ``(T, H)`` tensor of :meth:`Routing.to_tokens`.  Without autograd the ``(S, F)`` sums and
    the weighting are done in place (fewer large temporaries; same values)."""
    s, inplace = route.num_pairs, not torch.is_grad_enabled()
    xs = x[route.token]  # (S, H)
    low = grouped_linear(route.stack2(grouped_linear(xs, ops["gu_in"], route.offs)), ops["gu_out"], route.offs2)
    cg = dense_linear(x, ops["core_gate"])[route.token]  # (S, F)
    cu = dense_linear(x, ops["core_up"])[route.token]  # (S, F)
    gate, up = (low[:s].add_(cg), low[s:].add_(cu)) if inplace else (cg + low[:s], cu + low[s:])
    gate, up = _gate_up_bias(gate, up, route, bias_gu)
    h = act(gate, up)  # (S, F)
    hw = h.mul_(route.weight) if inplace else route.weight * h  # weighted: the down path is linear in h
    mixed = route.to_tokens(hw)  # (T, F) = Σ_pairs w h
    y = grouped_linear(grouped_linear(hw, ops["down_in"], route.offs), ops["down_out"], route.offs)  # (S, H)
    if bias_down is not None:
        y = y + route.weight * bias_down[route.expert]
    return route.to_tokens(y).add_(dense_linear(mixed, ops["core_down"]))  # (T, H), contiguous


def wrapper_forward(x: torch.Tensor, route: Routing, ops: dict, act: Activation,
                    bias_gu: tuple | None = None, bias_down: torch.Tensor | None = None) -> torch.Tensor:
    """Wrapper form, per pair ``x + U_in(V_inᵀx) -> C· -> h + U_out(V_outᵀh)``, the core once
    per pair.  ``x (T, H) -> (T, H)``."""
    s, h = route.num_pairs, x.shape[1]
    xs = x[route.token]  # (S, H)
    z = route.stack2(grouped_linear(xs, ops["gu_in_v"], route.offs))  # (2S, r')
    xi = (grouped_linear(z, ops["gu_in_u"], route.offs2).view(2, s, h) + xs).view(2 * s, h)  # (2S, H)
    core_offs = torch.arange(1, 3, device=x.device, dtype=torch.int32) * s  # (2,): gate rows, up rows
    y = grouped_linear(xi, ops["core_gu"], core_offs)  # (2S, F)
    y = y + grouped_linear(grouped_linear(y, ops["gu_out_v"], route.offs2), ops["gu_out_u"], route.offs2)
    gate, up = _gate_up_bias(y[:s], y[s:], route, bias_gu)  # (S, F) each
    a = act(gate, up)  # (S, F)
    a = a + grouped_linear(grouped_linear(a, ops["down_in_v"], route.offs), ops["down_in_u"], route.offs)
    y = a @ ops["core_down"].mT  # (S, H): the core once per pair
    y = y + grouped_linear(grouped_linear(y, ops["down_out_v"], route.offs), ops["down_out_u"], route.offs)
    if bias_down is not None:
        y = y + bias_down[route.expert]
    return route.to_tokens(route.weight * y)
