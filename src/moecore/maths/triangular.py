"""Products with lower-triangular whitening factors that skip their zero upper triangle.

The fit's largest products are ``R_i L_i``, ``M_i L_iᵀ`` and ``L_i B̃_i`` with ``L_i (d, d)``
lower-triangular (:func:`moecore.maths.fit.whiten_in_place`).  A dense GEMM spends half of its
multiply-adds on zeros.  Split at ``h = d/2``, ``L = [[L₁₁, 0], [L₂₁, L₂₂]]``:

* ``A L = [A₁ L₁₁ + A₂ L₂₁,  A₂ L₂₂]``,
* ``A Lᵀ = [A₁ L₁₁ᵀ,  A₁ L₂₁ᵀ + A₂ L₂₂ᵀ]``,
* ``L B = [L₁₁ B₁;  L₂₁ B₁ + L₂₂ B₂]``,

three of the four block products, the two diagonal ones triangular again: recursing while a
block is at least :data:`MIN_BLOCK` wide does 62.5% of the dense multiply-adds at two levels.
Below ``2·MIN_BLOCK`` (the bundled models' shapes) the product is the dense one, unchanged.
Results differ from the dense product by summation order only.
"""
from __future__ import annotations

import torch

Tensor = torch.Tensor

#: smallest block the recursion makes (smaller GEMMs lose more efficiency than they save)
MIN_BLOCK = 512


def _mm_add(c: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``c + a @ b`` (one ``baddbmm`` when 3-D)."""
    if c.dim() == 3 and a.dim() == 3 and b.dim() == 3:
        return torch.baddbmm(c, a, b)
    return c + a @ b


def lower_right(a: Tensor, l: Tensor) -> Tensor:
    """``a @ l`` for lower-triangular ``l (..., d, d)``, ``a (..., m, d)``."""
    d = l.shape[-1]
    if d < 2 * MIN_BLOCK:
        return a @ l
    h = d // 2
    a1, a2 = a[..., :h], a[..., h:]
    out = torch.empty(*torch.broadcast_shapes(a.shape[:-1], l.shape[:-2] + a.shape[-2:-1]), d,
                      dtype=a.dtype, device=a.device)
    out[..., :h] = _mm_add(lower_right(a1, l[..., :h, :h]), a2, l[..., h:, :h])
    out[..., h:] = lower_right(a2, l[..., h:, h:])
    return out


def upper_right(a: Tensor, l: Tensor) -> Tensor:
    """``a @ l.mT`` for lower-triangular ``l (..., d, d)``, ``a (..., m, d)``."""
    d = l.shape[-1]
    if d < 2 * MIN_BLOCK:
        return a @ l.mT
    h = d // 2
    a1, a2 = a[..., :h], a[..., h:]
    out = torch.empty(*torch.broadcast_shapes(a.shape[:-1], l.shape[:-2] + a.shape[-2:-1]), d,
                      dtype=a.dtype, device=a.device)
    out[..., :h] = upper_right(a1, l[..., :h, :h])
    out[..., h:] = _mm_add(upper_right(a2, l[..., h:, h:]), a1, l[..., h:, :h].mT)
    return out


def lower_left(l: Tensor, b: Tensor) -> Tensor:
    """``l @ b`` for lower-triangular ``l (..., d, d)``, ``b (..., d, s)``."""
    d = l.shape[-1]
    if d < 2 * MIN_BLOCK:
        return l @ b
    h = d // 2
    b1, b2 = b[..., :h, :], b[..., h:, :]
    out = torch.empty(*torch.broadcast_shapes(b.shape[:-2], l.shape[:-2]), d, b.shape[-1],
                      dtype=b.dtype, device=b.device)
    out[..., :h, :] = lower_left(l[..., :h, :h], b1)
    out[..., h:, :] = _mm_add(lower_left(l[..., h:, h:], b2), l[..., h:, :h], b1)
    return out


def dense_fraction(d: int) -> float:
    """The share of a dense product's multiply-adds that these products do with a ``(d, d)``
    factor: ``(2·f(d/2) + 1)/4`` while split, 1 below ``2·MIN_BLOCK`` (0.625 at d = 2048,
    0.5625 at 7168)."""
    return 1.0 if d < 2 * MIN_BLOCK else (2 * dense_fraction(d // 2) + 1) / 4
