"""lm-evaluation-harness on an in-process model, with moecore's offline held-out tasks.

The shipped tasks live in ``moecore/tasks/`` (YAML + jsonl made by
``scripts/make_eval_tasks.py`` from the held-out split):

- ``moecore_heldout_ppl``: ``loglikelihood_rolling`` over 64 held-out passages
  (word_perplexity, byte_perplexity, bits_per_byte);
- ``moecore_heldout_mc``: pick the true next sentence among 4 (acc, acc_norm).

Any other name (``hellaswag``, ``wikitext`` ...) is passed through to lm-eval's own task
index, which needs the datasets to be downloadable or cached.
"""
from __future__ import annotations

import functools
import math
import os
import subprocess
from pathlib import Path

import yaml

from ..errors import ConfigError
from ..optional import require

TASKS_DIR = Path(__file__).resolve().parents[1] / "tasks"
OFFLINE_TASKS = ("moecore_heldout_ppl", "moecore_heldout_mc")


@functools.lru_cache(maxsize=2)
def task_manager(include_defaults: bool = True):
    """An lm-eval ``TaskManager`` that also indexes moecore's offline tasks (and lm-eval's own
    tasks unless ``include_defaults=False``, which skips indexing thousands of YAML files).
    Built once per process: :func:`check_tasks` and :func:`run_lm_eval` share the index."""
    return require("lm_eval.tasks", "lm-eval evaluation").TaskManager(include_path=str(TASKS_DIR), include_defaults=include_defaults)


def _task_specs(names: list[str]) -> list:
    """Task names, with moecore's offline tasks given their data files as absolute paths
    (the YAML's relative ``data_files`` would otherwise resolve against the cwd)."""
    specs: list = []
    for name in names:
        if name in OFFLINE_TASKS:
            cfg = yaml.safe_load((TASKS_DIR / f"{name}.yaml").read_text(encoding="utf-8"))
            files = cfg["dataset_kwargs"]["data_files"]
            cfg["dataset_kwargs"]["data_files"] = {split: str(TASKS_DIR / f) for split, f in files.items()}
            specs.append(cfg)
        else:
            specs.append(name)
    return specs


def _quiet_git_hash() -> str | None:
    """lm-eval's ``get_git_commit_hash`` without its side effect: lm-eval runs ``git describe``
    in the current folder to record its own version, and outside a git checkout git prints
    ``fatal: not a git repository`` on stderr.  Same result, git's stderr discarded."""
    try:
        return subprocess.check_output(["git", "describe", "--always"], stderr=subprocess.DEVNULL,  # noqa: S607
                                       cwd=os.getcwd()).strip().decode()
    except (subprocess.CalledProcessError, FileNotFoundError, OSError):
        return None


def parse_tasks(tasks: str | list[str]) -> list[str]:
    """``"a,b"`` or ``["a", "b"]`` -> ``["a", "b"]``; raises ValueError when empty."""
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if not names:
        raise ConfigError("no lm-eval task given")
    return names


def check_tasks(tasks: str | list[str]) -> list[str]:
    """The task names, each checked against lm-eval's index (plus moecore's offline tasks)
    before any model is loaded; an unknown name is one ``ConfigError``."""
    names = parse_tasks(tasks)
    known = set(task_manager(not set(names) <= set(OFFLINE_TASKS)).all_tasks)
    unknown = [n for n in names if n not in known and n not in OFFLINE_TASKS]
    if unknown:
        raise ConfigError(f"unknown lm-eval task(s): {', '.join(unknown)} (moecore's offline tasks: "
                          f"{', '.join(sorted(OFFLINE_TASKS))}; lm-eval's: `lm_eval --tasks list`)")
    return names


def run_lm_eval(model, tokenizer, tasks: str | list[str], *, limit: int | float | None = None,
                batch_size: int = 8, max_length: int | None = None, num_fewshot: int | None = None,
                log_samples: bool = False, seed: int = 0) -> dict:
    """Run lm-eval's ``simple_evaluate`` on ``model`` (already loaded, any moecore form).

    ``max_length`` sets the window of rolling-loglikelihood tasks (default: the model's
    ``max_position_embeddings`` as lm-eval resolves it). Returns lm-eval's full result dict
    (``results``, ``configs``, ``n-samples``, and ``samples`` when ``log_samples``).
    """
    simple_evaluate = require("lm_eval", "lm-eval evaluation").simple_evaluate
    HFLM = require("lm_eval.models.huggingface", "lm-eval evaluation").HFLM
    names = parse_tasks(tasks)
    was_training = model.training
    model.eval()
    kwargs = {"max_length": max_length} if max_length else {}
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **kwargs)
    evaluator = require("lm_eval.evaluator", "lm-eval evaluation")
    git_hash = getattr(evaluator, "get_git_commit_hash", None)
    if git_hash is not None:
        evaluator.get_git_commit_hash = _quiet_git_hash  # no "fatal: not a git repository" on stderr
    try:
        out = simple_evaluate(model=lm, tasks=_task_specs(names), task_manager=task_manager(not set(names) <= set(OFFLINE_TASKS)),
                              limit=limit, num_fewshot=num_fewshot, log_samples=log_samples,
                              bootstrap_iters=0, random_seed=seed, numpy_random_seed=seed,
                              torch_random_seed=seed, fewshot_random_seed=seed)
    finally:
        model.train(was_training)
        if git_hash is not None:
            evaluator.get_git_commit_hash = git_hash
    if out is None:  # non-zero ranks under distributed evaluation
        return {}
    return out


def summarize(results: dict) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` from an lm-eval result dict, dropping stderr entries and
    the ``,none`` filter suffix; non-finite values are kept as floats."""
    table: dict[str, dict[str, float]] = {}
    for task, metrics in (results.get("results") or {}).items():
        row = {}
        for key, val in metrics.items():
            if "_stderr" in key or key == "alias" or not isinstance(val, (int, float)):
                continue
            row[key.split(",")[0]] = float(val)
        table[task] = row
    return table


def format_table(summary: dict[str, dict[str, float]]) -> str:
    """A plain-text table of :func:`summarize` output (one line per task and metric)."""
    lines = []
    for task, row in summary.items():
        for metric, val in row.items():
            shown = f"{val:.4f}" if math.isfinite(val) else str(val)
            lines.append(f"{task:28s} {metric:18s} {shown}")
    return "\n".join(lines)
