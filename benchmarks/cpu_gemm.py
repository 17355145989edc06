"""Matrix-multiply throughput of this machine per dtype (float32, float64, bfloat16, float16)
and thread count: why the engine computes half-precision layers in float32 on a CPU
(docs/DESIGN.md "Half precision on a CPU", RESULTS §7c).

    python benchmarks/cpu_gemm.py [--n 1024] [--threads 1 2]

Prints GFLOP/s (2 FLOPs per multiply-add) of ``torch.mm`` on ``n × n`` matrices, best of
three timed calls after one warm-up call, and each dtype's ratio to float32.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch


def gflops(dtype: torch.dtype, n: int, repeats: int = 3) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, torch.get_num_threads()])
    a = ap.parse_args()
    print(json.dumps({"torch": torch.__version__, "machine": platform.machine(),
                      "cpu_bf16_flags": sorted({f for f in open("/proc/cpuinfo").read().split()
                                                if f in ("avx512_bf16", "amx_bf16", "avx512f", "avx2")})
                      if platform.system() == "Linux" else None}))
    for th in sorted(set(a.threads)):
        torch.set_num_threads(th)
        row = {d: round(gflops(getattr(torch, d), a.n), 2) for d in ("float32", "float64", "bfloat16", "float16")}
        row.update({f"{d}/float32": round(row[d] / row["float32"], 4) for d in ("float64", "bfloat16", "float16")})
        print(json.dumps({"threads": th, "n": a.n, "gflops": row}))


if __name__ == "__main__":
    main()
