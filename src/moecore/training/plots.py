"""PNG plots of training curves and of evaluation metrics against step (matplotlib, Agg)."""
from __future__ import annotations

import os
from pathlib import Path

from ..optional import require


def _pyplot():
    require("matplotlib", "PNG plots").use("Agg", force=True)
    return require("matplotlib.pyplot", "PNG plots")


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)


def plot_training_curves(log_history: list[dict], path: str | Path) -> Path | None:
    """Loss (total, KD, CE) and learning rate against step from ``Trainer.state.log_history``.
    Returns the PNG path, or None when nothing was logged."""
    rows = [r for r in log_history if "loss" in r and "step" in r]
    if not rows:
        return None
    plt = _pyplot()
    path = Path(path)
    # the KD term and CE live on different scales (e.g. 0.005 vs 3.8): one panel each
    fig, (ax0, ax1, ax2) = plt.subplots(1, 3, figsize=(14, 4))
    for ax, keys in ((ax0, (("kd_loss", "KD (T²·KL)"),)), (ax1, (("loss", "total"), ("ce_loss", "CE")))):
        for key, label in keys:
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=label)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
    ax0.set_title("KD term")
    ax1.set_title("total loss and cross-entropy")
    lrs = [(r["step"], r["learning_rate"]) for r in rows if "learning_rate" in r]
    if lrs:
        ax2.plot(*zip(*lrs), color="tab:green")
    ax2.set_xlabel("step")
    ax2.set_ylabel("learning rate")
    ax2.set_title("schedule")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def plot_eval_curve(rows: list[dict], path: str | Path, metric: str = "ppl") -> Path | None:
    """``metric`` (default held-out perplexity) against step from ``eval_results.jsonl`` rows."""
    pts = sorted((r["step"], r[metric]) for r in rows if r.get(metric) is not None and "step" in r)
    if not pts:
        return None
    plt = _pyplot()
    path = Path(path)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(*zip(*pts), marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel(f"held-out {metric}")
    ax.set_title("checkpoint evaluation")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path
