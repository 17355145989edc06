"""Where a Gram stack larger than host memory lives: a memory-mapped scratch file on disk.

A layer's per-expert Grams of the experts' input (gate/up) and then their whitening factors
(:func:`moecore.maths.fit.whiten_in_place`, in place) form one ``(E, d, d)`` stack. At
DeepSeek-V3's shape that is 256 × 7168² float32, 52.6 GB. Both contents are determined by
their lower triangle: the Grams are symmetric, the factors lower triangular. So on disk the
stack keeps only the lower block triangle (:class:`TriangularStack`), about half the bytes,
and every pass over the experts reads half as much from disk.

* :func:`scratch_tensor`: a host tensor backed by a file that is unlinked at once;
* :class:`TriangularStack`: an ``(E, d, d)`` stack of symmetric or lower-triangular matrices
  stored as row blocks of their lower triangle in a scratch tensor; read and written a slice
  of experts at a time (``s[a:b]``, ``s[e]``) as dense tensors, like the tensor it stands for.
"""
from __future__ import annotations

import math
import os
import tempfile

import torch
from torch import Tensor

#: rows per stored block: the diagonal blocks' upper halves are stored too (7% more than the
#: exact triangle at d = 7168), in exchange for one copy per block instead of one per row
BLOCK_ROWS = 512


def scratch_tensor(shape: tuple[int, ...], dtype: torch.dtype, folder) -> torch.Tensor:
    """A host tensor backed by a memory-mapped file in ``folder`` (the kernel writes its pages
    to disk instead of holding them all in memory).  The file is unlinked at once: it lives as
    long as the tensor, and nothing is left behind, even by a killed run."""
    fd, path = tempfile.mkstemp(prefix="moecore-grams-", suffix=".bin", dir=folder)
    os.close(fd)
    try:
        return torch.from_file(path, shared=True, size=math.prod(shape), dtype=dtype).view(shape)
    finally:
        os.unlink(path)


def row_blocks(d: int, block_rows: int = BLOCK_ROWS) -> list[tuple[int, int, int]]:
    """``(a, b, offset)`` of each stored row block ``[a, b)`` (columns ``[0, b)``) of a ``d × d``
    matrix; the last ``offset`` plus its block's size is the elements stored per matrix."""
    blocks, offset = [], 0
    for a in range(0, d, block_rows):
        b = min(a + block_rows, d)
        blocks.append((a, b, offset))
        offset += (b - a) * b
    return blocks


def stored_elements(d: int, block_rows: int = BLOCK_ROWS) -> int:
    """Elements a :class:`TriangularStack` stores per ``d × d`` matrix (``d²/2`` and the
    diagonal blocks' upper halves)."""
    a, b, offset = row_blocks(d, block_rows)[-1]
    return offset + (b - a) * b


class TriangularStack:
    """``(E, d, d)`` symmetric (``symmetric=True``: Grams) or lower-triangular
    (``symmetric=False``: Cholesky factors) matrices, of which only the lower block triangle is
    stored, in a :func:`scratch_tensor` in ``folder``.

    Row block ``[a, b)`` keeps columns ``[0, b)``.  Reading experts ``s[idx]`` (an int or a
    slice) returns a new dense ``(…, d, d)`` tensor: the stored blocks, with the part above the
    diagonal blocks mirrored from below (symmetric) or zero (triangular).  Writing
    ``s[idx] = m`` keeps ``m``'s lower block triangle; what is above is dropped, so ``m`` must be
    symmetric or lower triangular, as :attr:`symmetric` says.  The owner sets ``symmetric=False``
    once every expert holds its factor."""

    def __init__(self, num_experts: int, d: int, dtype: torch.dtype, folder, block_rows: int = BLOCK_ROWS):
        self.shape = torch.Size((num_experts, d, d))
        self.dtype, self.device, self.symmetric = dtype, torch.device("cpu"), True
        self.folder, self.block_rows = folder, block_rows
        self.blocks = row_blocks(d, block_rows)  # (a, b, offset of row block [a, b) in a row of data)
        self.data = scratch_tensor((num_experts, stored_elements(d, block_rows)), dtype, folder)  # (E, ≈ d²/2)

    @property
    def nbytes(self) -> int:
        """Bytes on disk."""
        return self.data.numel() * self.data.element_size()

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx) -> Tensor:
        rows = self.data[idx]  # (c, P) or (P,)
        d = self.shape[-1]
        out = torch.zeros(*rows.shape[:-1], d, d, dtype=self.dtype)
        for a, b, off in self.blocks:
            out[..., a:b, :b] = rows[..., off: off + (b - a) * b].unflatten(-1, (b - a, b))
            if self.symmetric and a:
                out[..., :a, a:b] = out[..., a:b, :a].mT
        return out

    def __setitem__(self, idx, value: Tensor) -> None:
        value = value.to(device=self.device, dtype=self.dtype)
        for a, b, off in self.blocks:
            self.data[idx, off: off + (b - a) * b] = value[..., a:b, :b].flatten(-2)

    def clone(self) -> "TriangularStack":
        """A copy in a scratch file of its own."""
        new = TriangularStack(self.shape[0], self.shape[-1], self.dtype, self.folder, self.block_rows)
        new.symmetric = self.symmetric
        new.data.copy_(self.data)
        return new
