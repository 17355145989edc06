"""Entry point of the async-eval worker process: ``python -m moecore.training.eval_worker OUT``
(started by :class:`moecore.training.async_eval.EvalWorker`)."""
from __future__ import annotations

import argparse
import os
import sys

import torch

from .async_eval import watch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="moecore async checkpoint evaluator (worker process)")
    ap.add_argument("output_dir")
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--tasks", default=None)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--poll", type=float, default=0.5)
    a = ap.parse_args(argv)

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    tasks = [t for t in a.tasks.split(",") if t] if a.tasks else None

    n = watch(a.output_dir, max_tokens=a.max_tokens, tasks=tasks, limit=a.limit, poll=a.poll)
    print(f"[eval-worker] done: {n} checkpoint(s) evaluated", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
