"""Async evaluation: a background worker process evaluates every checkpoint while training
runs, and a crashing worker is reported without stopping training."""
from __future__ import annotations

import math

import pytest

from moecore.training import distill
from moecore.training.async_eval import FAULT_ENV, summary_table
from moecore.training.checkpoints import complete_checkpoints
from moecore.training.common import read_jsonl
from moecore.training.config import DistillConfig

from ._tiny_models import save_tiny


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("ae") / "teacher", seed=2)


def _run(teacher_dir, out):
    cfg = DistillConfig(max_steps=6, save_steps=2, lr=1e-2, block_size=64, batch_size=2, logging_steps=2,
                        eval_async=True, eval_max_tokens=1024)
    return distill(str(teacher_dir), None, out, cfg, compression=_cfg())


def _cfg():
    from moecore import CompressionConfig

    return CompressionConfig(form="delta", rank=4)


def test_worker_evaluates_every_checkpoint(teacher_dir, tmp_path):
    out = tmp_path / "run"
    res = _run(teacher_dir, out)
    assert res.eval_error is None
    rows = read_jsonl(out / "eval_results.jsonl")
    assert sorted(r["step"] for r in rows) == [2, 4, 6]
    assert {c.name for c in complete_checkpoints(out)} == {r["checkpoint"] for r in rows}
    for r in rows:
        assert math.isfinite(r["ppl"]) and r["ppl"] > 1
        assert r["tokens_scored"] == 1023 and r["seq_len"] == 256 and r["stride"] == 128
    assert len({round(r["ppl"], 6) for r in rows}) == 3  # three different students were evaluated
    assert (out / "eval_curve.png").stat().st_size > 1000
    table = summary_table(rows)
    assert "perplexity" in table and f"{rows[0]['ppl']:.4f}" in table


def test_worker_crash_is_reported_and_training_finishes(teacher_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(FAULT_ENV, "1")
    out = tmp_path / "run"
    res = _run(teacher_dir, out)
    assert res.global_step == 6 and (out / "final" / "config.json").is_file()
    assert res.eval_error is not None and "injected eval-worker fault" in res.eval_error
    assert read_jsonl(out / "eval_results.jsonl") == []
    assert "injected eval-worker fault" in capsys.readouterr().out
