"""Quantization primitives of the compressed experts' stored tensors (pure tensor maths, no
modules): b-bit groups with HQQ's quantizer and bit packing (``hqq.core.quantize.Quantizer``;
``method="hqq"``: half-quadratic optimized scale and zero point, ``method="rtn"``: min/max
round-to-nearest).  Nothing here re-implements HQQ.

Storage of one quantized tensor ``name`` (a form's stored name, e.g. ``core_gate``), as
``{name}{suffix}`` for the :data:`SUFFIXES`:

- ``_qcodes``: HQQ's packed codes (uint8 for 8/4/2 bits, int32 holding ten 3-bit codes);
- ``_qscale`` / ``_qzero``: one float16 scale and zero point per group, stored as their int16
  bit patterns so that no dtype cast (``model.to(bf16)``, ``from_pretrained(dtype=)``) can
  round them: the dequantized weights are the same in every dtype the module runs in.

Groups of ``group_size`` consecutive weights run along the input side of a core
``(d_out, d_in)`` and down each factor column (factors ``(E, d, s)`` are grouped as
``(E, s, d)``), so a group never mixes the columns of ``U√S`` that differ in scale.  The flat
tensor is zero-padded to whole packed rows (counted in the bytes).
"""
from __future__ import annotations

import math
from typing import Mapping

import torch
from hqq.core.quantize import Quantizer

SUFFIXES = ("_qcodes", "_qscale", "_qzero")
_ROW_MULTIPLE = {8: 1, 4: 2, 3: 1, 2: 4, 1: 8}  # HQQ packs 2 (4-bit) / 4 (2-bit) / 8 (1-bit) rows per byte row
_F16 = torch.float16


def _packing(bits: int) -> str:
    return Quantizer.bit_to_packing[bits]


def packed_layout(numel: int, bits: int, group: int) -> tuple[tuple[int, int], torch.dtype, int]:
    """``(codes shape, codes dtype, groups)`` of a tensor of ``numel`` weights once packed by HQQ
    (rows of ``group`` codes, padded to whole packed rows)."""
    rows = math.ceil(numel / (group * _ROW_MULTIPLE[bits])) * _ROW_MULTIPLE[bits]  # groups
    if bits == 3:
        return (math.ceil(rows / 10), group), torch.int32, rows
    return (rows * bits // 8, group), torch.uint8, rows


def _stored_view(t: torch.Tensor, kind: str) -> torch.Tensor:
    """The orientation whose consecutive elements form a group: core as is, factors ``(E, s, d)``."""
    return t.mT if kind == "factor" else t


def quantize(t: torch.Tensor, bits: int, group: int, method: str = "hqq", kind: str = "core") -> dict[str, torch.Tensor]:
    """Quantize ``t`` with HQQ into ``{"qcodes", "qscale", "qzero"}`` (see the module docstring).
    ``kind="factor"`` groups down the columns of ``t (E, d, s)``."""
    flat = _stored_view(t.detach(), kind).to(torch.float32).contiguous().reshape(-1)
    (codes_shape, _, rows) = packed_layout(flat.numel(), bits, group)
    flat = torch.nn.functional.pad(flat, (0, rows * group - flat.numel()))
    codes, meta = Quantizer.quantize(flat.reshape(rows, group), nbits=bits, group_size=group, optimize=method == "hqq",
                                     axis=1, bitpack=True, compute_dtype=torch.float32, device=flat.device.type)
    assert tuple(codes.shape) == codes_shape, (codes.shape, codes_shape)
    as_bits = lambda x: x.reshape(rows, 1).to(_F16).view(torch.int16)  # noqa: E731
    return {"qcodes": codes, "qscale": as_bits(meta["scale"]), "qzero": as_bits(meta["zero"])}


def dequantize(q: Mapping[str, torch.Tensor], shape: tuple[int, ...], bits: int, kind: str = "core",
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize`: ``(codes − zero)·scale`` via HQQ's unpacking, as ``dtype``
    in the logical ``shape``."""
    scale, zero = q["qscale"].view(_F16).float(), q["qzero"].view(_F16).float()  # (rows, 1)
    codes = Quantizer.unpack[_packing(bits)](q["qcodes"], dtype=torch.float32)[: scale.shape[0]]  # (rows, group)
    flat = ((codes - zero) * scale).reshape(-1)
    view_shape = (*shape[:-2], shape[-1], shape[-2]) if kind == "factor" else tuple(shape)
    w = flat[: math.prod(shape)].reshape(view_shape)
    return _stored_view(w, kind).to(dtype).contiguous()
