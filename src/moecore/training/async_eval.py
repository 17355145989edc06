"""Asynchronous checkpoint evaluation in a separate worker process.

``EvalWorker(output_dir, ...).start()`` launches ``python -m moecore.training.eval_worker``.
The worker watches ``output_dir`` for complete ``checkpoint-N`` directories (published by
atomic rename, so a directory it sees is whole), evaluates each once — held-out perplexity
with the pinned protocol on the first ``max_tokens`` tokens, and optionally lm-eval tasks —
appends a row to ``eval_results.jsonl``, and redraws ``eval_curve.png``. When training ends
the trainer touches ``.eval_stop``; the worker evaluates what is left and exits. A worker
crash never stops training: it is reported (with the end of ``eval_worker.log``).
Set ``MOECORE_EVAL_WORKER_FAULT=1`` to make the worker raise (fault injection for tests).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from ..data import load_split, token_stream
from ..evaluation.lm_eval_tasks import run_lm_eval, summarize
from ..evaluation.perplexity import perplexity
from ..modeling import load_model
from .checkpoints import complete_checkpoints, step_of
from .common import append_jsonl, read_jsonl
from .plots import plot_eval_curve

RESULTS = "eval_results.jsonl"
CURVE = "eval_curve.png"
LOG = "eval_worker.log"
STOP = ".eval_stop"
FAULT_ENV = "MOECORE_EVAL_WORKER_FAULT"


def heldout_stream(tokenizer, max_tokens: int | None):
    """The held-out token stream (texts joined with EOS), tokenized only up to ``max_tokens``."""
    ids = token_stream(tokenizer, load_split("heldout"), min_tokens=max_tokens)
    return ids[:max_tokens] if max_tokens else ids


def evaluate_checkpoint(path: Path, *, max_tokens: int | None, tasks: list[str] | None = None,
                        limit: int | None = None, stream=None) -> dict:
    """One ``eval_results.jsonl`` row for a checkpoint directory."""
    t0 = time.time()
    model, tok = load_model(path)
    if stream is None:
        stream = heldout_stream(tok, max_tokens)
    res = perplexity(model, tok, stream=stream, progress=False)
    row = {"step": step_of(path), "checkpoint": path.name, "split": "heldout", **res.as_dict()}
    if tasks:
        row["lm_eval"] = summarize(run_lm_eval(model, tok, tasks, limit=limit))
    row["eval_seconds"] = round(time.time() - t0, 3)
    return row


def watch(output_dir: str | Path, *, max_tokens: int | None = 16384, tasks: list[str] | None = None,
          limit: int | None = None, poll: float = 0.5) -> int:
    """The worker loop; returns the number of checkpoints evaluated by this call."""
    out = Path(output_dir)
    results = out / RESULTS
    done = {r.get("checkpoint") for r in read_jsonl(results)}
    stream, n = None, 0
    while True:
        stopping = (out / STOP).exists()  # read before scanning: nothing published earlier is missed
        for c in complete_checkpoints(out):
            if c.name in done:
                continue
            if os.environ.get(FAULT_ENV):
                raise RuntimeError(f"injected eval-worker fault ({FAULT_ENV} is set) at {c.name}")
            try:
                row = evaluate_checkpoint(c, max_tokens=max_tokens, tasks=tasks, limit=limit, stream=stream)
            except (OSError, ValueError) as exc:  # e.g. rotated away while loading
                if c.exists():
                    raise
                row = {"step": step_of(c), "checkpoint": c.name, "error": f"vanished: {exc}"}
            append_jsonl(results, row)
            done.add(c.name)
            n += 1
            plot_eval_curve(read_jsonl(results), out / CURVE)
            print(f"[eval-worker] {c.name}: ppl {row.get('ppl', float('nan')):.4f}", flush=True)
        if stopping:
            return n
        time.sleep(poll)


class EvalWorker:
    """Handle on the background evaluation process (started by the trainer's main process)."""

    def __init__(self, output_dir: str | Path, *, max_tokens: int | None = 16384, tasks: list[str] | None = None,
                 limit: int | None = None, poll: float = 0.5, threads: int = 1):
        self.out = Path(output_dir)
        self.max_tokens, self.tasks, self.limit, self.poll, self.threads = max_tokens, tasks, limit, poll, threads
        self.proc: subprocess.Popen | None = None
        self._reported = False

    def start(self) -> "EvalWorker":
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / STOP).unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "moecore.training.eval_worker", str(self.out), "--poll", str(self.poll)]
        if self.max_tokens:
            cmd += ["--max-tokens", str(self.max_tokens)]
        if self.tasks:
            cmd += ["--tasks", ",".join(self.tasks)]
        if self.limit:
            cmd += ["--limit", str(self.limit)]
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "TOKENIZERS_PARALLELISM": "false"}
        log = open(self.out / LOG, "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        return self

    def log_tail(self, n: int = 3) -> str:
        p = self.out / LOG
        lines = p.read_text(encoding="utf-8", errors="replace").strip().splitlines() if p.is_file() else []
        return " | ".join(lines[-n:])

    def crashed(self) -> str | None:
        """A one-line report when the worker has died with an error (reported once), else None."""
        if self.proc is None or self._reported or self.proc.poll() in (None, 0):
            return None
        self._reported = True
        return f"eval worker crashed (exit {self.proc.returncode}); training continues. {self.log_tail(1)}"

    def finish(self, timeout: float | None = None) -> dict:
        """Ask the worker to stop after the remaining checkpoints, wait, and return
        ``{"returncode", "rows", "error"}``."""
        (self.out / STOP).touch()
        rc = None
        if self.proc is not None:
            try:
                rc = self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                rc = self.proc.wait()
        (self.out / STOP).unlink(missing_ok=True)
        err = None if rc == 0 else f"eval worker exited with {rc}: {self.log_tail(1)}"
        return {"returncode": rc, "rows": read_jsonl(self.out / RESULTS), "error": err}


def summary_table(rows: list[dict], error: str | None = None) -> str:
    """A rich-rendered table of the evaluation rows (step, perplexity, tokens, seconds)."""
    table = Table(title="checkpoint evaluation (held-out)")
    for col in ("step", "perplexity", "nll", "tokens", "seconds"):
        table.add_column(col, justify="right")
    extra = sorted({f"{t}/{m}" for r in rows for t, ms in (r.get("lm_eval") or {}).items() for m in ms})
    for col in extra:
        table.add_column(col, justify="right")
    for r in sorted(rows, key=lambda r: r.get("step") or 0):
        cells = [str(r.get("step")), f"{r['ppl']:.4f}" if "ppl" in r else r.get("error", "-"),
                 f"{r['nll']:.4f}" if "nll" in r else "-", str(r.get("tokens_scored", "-")),
                 str(r.get("eval_seconds", "-"))]
        for col in extra:
            t, m = col.split("/", 1)
            v = (r.get("lm_eval") or {}).get(t, {}).get(m)
            cells.append("-" if v is None else f"{v:.4f}")
        table.add_row(*cells)
    console = Console(width=120, record=True, file=open(os.devnull, "w"))
    console.print(table)
    if error:
        console.print(f"[red]{error}[/red]")
    return console.export_text()
