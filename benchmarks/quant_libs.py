"""Which quantization library does moecore use?  Measured CPU quality and speed of the
candidates' group-wise weight quantizers on real expert weights.

For every expert projection of one layer of each bundled model (weights as stored, bf16 ->
float32), at 4/3/2 bits and group 64 along d_in, this measures:
- quality: relative Frobenius error ``‖W − deq(q(W))‖ / ‖W‖`` over the layer;
- speed: quantize (incl. packing where the library packs) and dequantize wall time, 1 thread,
  median of 3.

Candidates (each through its public or documented primitives, nothing re-implemented):
- ``hqq``: ``hqq.core.quantize.Quantizer`` (``optimize=False``: RTN with float zero point;
  ``optimize=True``: HQQ's half-quadratic solver), bit-packed storage for 8/4/3/2/1 bits;
- ``torchao``: ``quant_primitives`` RTN (``choose_qparams_affine`` / ``quantize_affine`` /
  ``dequantize_affine``, integer zero point, codes kept one per uint8) and its HQQ port
  ``_choose_qparams_and_quantize_affine_hqq``;
- ``optimum-quanto``: ``MaxOptimizer`` (RTN) / ``HqqOptimizer`` + ``quantize_weight``
  (``qint4``/``qint2`` only: no 3-bit type).

Usage: python benchmarks/quant_libs.py [--out benchmarks/results/quant_libs.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics as st
import sys
import time
from pathlib import Path

import torch

from moecore.families import find_experts
from moecore.modeling import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import provenance  # noqa: E402

REPO = Path(__file__).resolve().parents[1]  # the source checkout (bundled models, results)

GROUP = 64


def _timed(fn, repeats: int = 3):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, st.median(times)


def hqq_lib(w: torch.Tensor, bits: int, optimize: bool):
    from hqq.core.quantize import Quantizer

    m = w.reshape(-1, w.shape[-1])  # 2-D: the 3-bit unpacking reads shape[0] * shape[1]

    def q():
        return Quantizer.quantize(m, nbits=bits, group_size=GROUP, optimize=optimize, axis=1, device="cpu",
                                  compute_dtype=torch.float32)
    (wq, meta), tq = _timed(q)
    meta["compute_dtype"] = torch.float32
    deq, td = _timed(lambda: Quantizer.dequantize(wq, meta))
    return deq.reshape(w.shape), tq, td


def torchao_rtn(w: torch.Tensor, bits: int):
    from torchao.quantization.quant_primitives import (
        MappingType, choose_qparams_affine, dequantize_affine, quantize_affine)

    g, qmax, bs = w.reshape(-1, GROUP), 2 ** bits - 1, (1, GROUP)

    def q():
        s, z = choose_qparams_affine(g, MappingType.ASYMMETRIC, bs, torch.uint8, quant_min=0, quant_max=qmax)
        return quantize_affine(g, bs, s, z, torch.uint8, quant_min=0, quant_max=qmax), s, z
    (codes, s, z), tq = _timed(q)
    deq, td = _timed(lambda: dequantize_affine(codes, bs, s, z, torch.uint8, quant_min=0, quant_max=qmax,
                                               output_dtype=torch.float32))
    return deq.reshape(w.shape), tq, td


def torchao_hqq(w: torch.Tensor, bits: int):
    from torchao.quantization.quant_primitives import _choose_qparams_and_quantize_affine_hqq

    def q():
        return _choose_qparams_and_quantize_affine_hqq(w.reshape(-1, w.shape[-1]), nbits=bits, group_size=GROUP,
                                                       optimize=True, axis=1, compute_dtype=torch.float32,
                                                       device="cpu", raw_output=True)
    (codes, s, z, shape), tq = _timed(q)
    deq, td = _timed(lambda: ((codes.reshape(-1, GROUP).float() - z.reshape(-1, 1)) * s.reshape(-1, 1)).reshape(w.shape))
    return deq, tq, td


def quanto(w: torch.Tensor, bits: int, optimizer: str):
    from optimum.quanto import qint2, qint4
    from optimum.quanto.tensor.optimizers import HqqOptimizer, MaxOptimizer
    from optimum.quanto.tensor.weights import quantize_weight

    qtype = {4: qint4, 2: qint2}.get(bits)
    if qtype is None:
        return None
    m = w.reshape(-1, w.shape[-1])
    opt = MaxOptimizer() if optimizer == "rtn" else HqqOptimizer()

    def q():
        scale, shift = opt(m, qtype=qtype, axis=0, group_size=GROUP)
        return quantize_weight(m, qtype=qtype, axis=0, scale=scale, shift=shift, group_size=GROUP, optimized=False)
    qt, tq = _timed(q)
    deq, td = _timed(lambda: qt.dequantize())
    return deq.reshape(w.shape).float(), tq, td


CANDIDATES = {
    "hqq-lib rtn": lambda w, b: hqq_lib(w, b, False),
    "hqq-lib hqq": lambda w, b: hqq_lib(w, b, True),
    "torchao rtn": torchao_rtn,
    "torchao hqq": torchao_hqq,
    "quanto rtn": lambda w, b: quanto(w, b, "rtn"),
    "quanto hqq": lambda w, b: quanto(w, b, "hqq"),
}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["tiny-mixtral", "tiny-qwen3moe"])
    ap.add_argument("--bits", nargs="+", type=int, default=[4, 3, 2])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "quant_libs.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for name in args.models:
        model, _ = load_model(REPO / "models" / name)
        path, module, layout = find_experts(model)[0]
        weights = {p: v.detach().float().contiguous() for p, v in layout.split(module).items() if p in ("gate", "up", "down")}
        for bits in args.bits:
            for cand, fn in CANDIDATES.items():
                err2 = ref2 = tq = td = 0.0
                ok = True
                for p, w in weights.items():
                    try:
                        out = fn(w, bits)
                    except (RuntimeError, ValueError) as exc:  # e.g. d_in % group != 0 (torchao HQQ, quanto)
                        out, why = None, f"{p}: {str(exc).splitlines()[0]}"
                    else:
                        why = "no such bit width"
                    if out is None:
                        ok = False
                        break
                    deq, a, b = out
                    err2 += float((w - deq).double().pow(2).sum())
                    ref2 += float(w.double().pow(2).sum())
                    tq, td = tq + a, td + b
                row = {"model": name, "layer": path, "bits": bits, "candidate": cand}
                row.update({"rel_error": (err2 / ref2) ** 0.5, "quantize_s": tq, "dequantize_s": td} if ok
                           else {"unsupported": why})
                rows.append(row)
                print(json.dumps(row), flush=True)
    import hqq
    import optimum.quanto
    import torchao
    meta = {"group": GROUP, "threads": 1, "versions": {
        "torch": torch.__version__, "hqq": getattr(hqq, "__version__", "0.2.8.post1"),
        "torchao": torchao.__version__, "optimum-quanto": getattr(optimum.quanto, "__version__", None),
        "python": platform.python_version()}, "provenance": provenance(config=vars(args))}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return {"meta": meta, "rows": rows}


if __name__ == "__main__":
    main()
