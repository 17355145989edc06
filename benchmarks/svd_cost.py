"""Seconds of the fit's randomized SVD at real layer shapes: ``maths.decompose.truncated_svd``
against the code it replaced, in the same run (issue 21, RESULTS §7e).

    python benchmarks/svd_cost.py [--shapes qwen3-gate mixtral-down ...] [--repeats 2] [--out F.json]

The replaced code (``reference`` below, as it was in commit 27326e8) took the small
``c × b`` SVD of the range finder with LAPACK on one thread; today's ``truncated_svd`` takes it
from the ``eigh`` of its ``c × c`` Gram in float64 (``decompose._short_svd``).  Both
orthonormalize with Householder QR on one thread.  Each shape is a batch of whitened-residual-like matrices
(Gaussian times a decaying spectrum) at the fit's expert chunk and the default ragged width
(2 × the mean rank at 25%, + 8 oversampling); "cold" is the first fit pass (4 power
iterations), "warm" the refinement passes (1, from the previous right vectors).  Accuracy:
the captured energy ``Σσ²`` of the two, relative, and the new ``U``'s orthogonality.
``--parts`` also times the pieces alone (QR, CholeskyQR2 in float64 and float32, the small SVD
both ways, the range finder's product), which is how CholeskyQR2 was measured and dropped.
``--gram`` times the gram path (``truncated_svd(..., "gram")``: the exact top triplets from
the float32 Gram's ``eigh``) against the randomized one at each shape, a fit's worth of calls
(1 cold + ``--warm-passes`` warm randomized, against ``1 + warm-passes`` Gram calls), with the
energy the randomized calls capture relative to the exact one (RESULTS §7f):

    python benchmarks/svd_cost.py --gram --shapes qwen3-gate qwen3-down deepseek-gate deepseek-down \
        mixtral-gate mixtral-down --out benchmarks/results/svd-gram.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from moecore.maths.decompose import _qr, _short_svd, one_thread, truncated_svd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import provenance  # noqa: E402

#: name -> (experts per chunk, d_out, d_in, width): the fit's chunk at fit_memory_gb=6 and the
#: ragged factor width (2 × the 25% mean rank: Qwen3-30B-A3B 135, Mixtral-8x7B 398)
SHAPES = {
    "qwen3-gate": (61, 768, 2048, 270),
    "qwen3-down": (61, 2048, 768, 270),
    "mixtral-gate": (1, 14336, 4096, 796),
    "mixtral-down": (1, 4096, 14336, 796),
    "deepseek-gate": (4, 2048, 7168, 784),  # DeepSeek-V3 (s 392; the chunk cut to 4 to keep the run short)
    "deepseek-down": (4, 7168, 2048, 784),
    "tiny": (4, 96, 128, 16),  # tests only
}


def reference(m, rank, oversample=8, power_iters=4, generator=None, init=None, warm_power_iters=1):
    """The randomized branch of ``truncated_svd`` before this change (Householder QR, LAPACK SVD)."""
    b = m.shape[-1]
    s = rank
    omega = torch.randn(*m.shape[:-2], b, s + oversample, dtype=m.dtype, generator=generator)
    if init is not None:
        omega[..., :s] = init[..., :s].to(omega)
        power_iters = warm_power_iters
    q = _qr(m @ omega)
    for _ in range(power_iters):
        q = _qr(m.mT @ q)
        q = _qr(m @ q)
    small = q.mT @ m
    with one_thread(m):
        ub, sv, vh = torch.linalg.svd(small, full_matrices=False)
    return (q @ ub)[..., :s], sv[..., :s], vh[..., :s, :].mT


def matrices(n, d_out, d_in, gen):
    """Gaussian with a decaying column spectrum (σ_j ∝ 1/√j), like whitened residuals."""
    k = min(d_out, d_in)
    decay = (torch.arange(1, k + 1, dtype=torch.float32) ** -0.5)
    u = torch.linalg.qr(torch.randn(d_out, k, generator=gen)).Q
    return (u * decay) @ torch.randn(n, k, d_in, generator=gen) / d_in ** 0.5  # (n, d_out, d_in)


def timed(fn, repeats):
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def run_shape(name, repeats):
    n, d_out, d_in, width = SHAPES[name]
    gen = torch.Generator().manual_seed(0)
    m = matrices(n, d_out, d_in, gen)
    row = {"shape": name, "experts": n, "d_out": d_out, "d_in": d_in, "width": width}
    v0 = None
    for start in ("cold", "warm"):
        def old():
            return reference(m, width, generator=torch.Generator().manual_seed(1), init=v0)

        def new():
            return truncated_svd(m, width, "randomized", generator=torch.Generator().manual_seed(1), init=v0)
        t_old, (_, s_old, _) = timed(old, repeats)
        t_new, (u, s_new, v) = timed(new, repeats)
        e_old, e_new = float(s_old.double().pow(2).sum()), float(s_new.double().pow(2).sum())
        eye = torch.eye(width, dtype=torch.float64)
        row[start] = {"reference_s": round(t_old, 3), "new_s": round(t_new, 3), "speedup": round(t_old / t_new, 2),
                      "energy_rel_diff": (e_new - e_old) / e_old,
                      "orthogonality": float((u.double().mT @ u.double() - eye).abs().max())}
        v0 = v
        print(f"{name:>13} {start}: reference {t_old:.3f} s, new {t_new:.3f} s ({t_old / t_new:.2f}x); "
              f"energy {row[start]['energy_rel_diff']:+.2e}, |UᵀU - I| {row[start]['orthogonality']:.1e}", flush=True)
    return row


def gram_row(name, repeats, warm_passes):
    """A fit's SVD calls at ``name``: randomized (1 cold, ``warm_passes`` warm) against the gram path."""
    n, d_out, d_in, width = SHAPES[name]
    m = matrices(n, d_out, d_in, torch.Generator().manual_seed(0))
    t_cold, (_, s_cold, v) = timed(lambda: truncated_svd(m, width, "randomized", generator=torch.Generator().manual_seed(1)),
                                   repeats)
    t_warm, (_, s_warm, _) = timed(lambda: truncated_svd(m, width, "randomized", generator=torch.Generator().manual_seed(1),
                                                         init=v), repeats)
    t_gram, (_, s_gram, _) = timed(lambda: truncated_svd(m, width, "gram"), repeats)
    exact = float(s_gram.double().pow(2).sum())
    rand = t_cold + warm_passes * t_warm
    gram = (1 + warm_passes) * t_gram
    row = {"shape": name, "experts": n, "d_out": d_out, "d_in": d_in, "width": width, "cold_s": round(t_cold, 3),
           "warm_s": round(t_warm, 3), "gram_s": round(t_gram, 3), "warm_passes": warm_passes,
           "fit_randomized_s": round(rand, 3), "fit_gram_s": round(gram, 3), "speedup": round(rand / gram, 2),
           "energy_cold_vs_exact": float(s_cold.double().pow(2).sum()) / exact,
           "energy_warm_vs_exact": float(s_warm.double().pow(2).sum()) / exact}
    print(f"{name:>13}: randomized {t_cold:.3f} s cold + {warm_passes} x {t_warm:.3f} s warm = {rand:.3f} s; gram "
          f"{1 + warm_passes} x {t_gram:.3f} = {gram:.3f} s ({rand / gram:.2f}x); energy cold "
          f"{row['energy_cold_vs_exact']:.6f}, warm {row['energy_warm_vs_exact']:.6f} of exact", flush=True)
    return row


def cholesky_qr2(y, dtype):
    """CholeskyQR2 with its Grams in ``dtype`` (measured, not used: see the module docstring)."""
    q = y.to(dtype)
    for _ in range(2):
        r = torch.linalg.cholesky(q.mT @ q, upper=True)
        q = torch.linalg.solve_triangular(r, q, upper=True, left=False)
    return q.to(y.dtype)


def parts(name, repeats):
    """Seconds of each piece alone at ``name``'s shape."""
    n, d_out, d_in, width = SHAPES[name]
    m = matrices(n, d_out, d_in, torch.Generator().manual_seed(0))
    c = width + 8
    y = m @ torch.randn(n, d_in, c)  # (n, d_out, c)
    small = _qr(y).mT @ m  # (n, c, d_in)

    def lapack_svd():
        with one_thread(m):
            return torch.linalg.svd(small, full_matrices=False)
    row = {"shape": name, **{k: round(timed(f, repeats)[0], 3) for k, f in {
        "householder_qr": lambda: _qr(y), "cholesky_qr2_f64": lambda: cholesky_qr2(y, torch.float64),
        "cholesky_qr2_f32": lambda: cholesky_qr2(y, torch.float32), "small_svd_lapack": lapack_svd,
        "small_svd_gram": lambda: _short_svd(small), "range_product": lambda: m @ torch.randn(n, d_in, c)}.items()}}
    print(json.dumps(row), flush=True)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES),
                    default=["qwen3-gate", "qwen3-down", "mixtral-gate", "mixtral-down"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--parts", action="store_true", help="also time each piece alone")
    ap.add_argument("--gram", action="store_true", help="the gram path against the randomized one, instead")
    ap.add_argument("--warm-passes", type=int, default=1, help="with --gram: refinement passes (1 at refine_steps=1)")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    if a.gram:
        out = {"threads": torch.get_num_threads(), "repeats": a.repeats, "provenance": provenance(),
               "gram": [gram_row(s, a.repeats, a.warm_passes) for s in a.shapes]}
        if a.out:
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(json.dumps(out, indent=1))
        return out
    rows = [run_shape(s, a.repeats) for s in a.shapes]
    out = {"threads": torch.get_num_threads(), "repeats": a.repeats, "rows": rows, "provenance": provenance()}
    if a.parts:
        out["parts"] = [parts(s, a.repeats) for s in a.shapes]
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
