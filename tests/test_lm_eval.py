"""lm-evaluation-harness on the in-process model: the offline held-out tasks run, agree with
moecore's own perplexity evaluator, and `moecore eval --tasks` works for original,
compressed and dense-exported directories."""
from __future__ import annotations

import json
import math

import pytest
import torch

import moecore
from moecore import CompressionConfig
from moecore.cli import main
from moecore.evaluation import perplexity
from moecore.evaluation.lm_eval_tasks import TASKS_DIR, run_lm_eval, summarize

from ._tiny_models import save_tiny, tiny_mixtral


def test_lm_eval_rolling_perplexity_matches_own_evaluator():
    """Token-level perplexity from lm-eval's ``loglikelihood_rolling`` equals moecore's
    evaluator on the same two held-out passages within 1%.

    Making the windows comparable: lm-eval scores each document separately, prefixing the
    BOS (= EOS here) token, in disjoint windows of ``max_length`` = M predicted tokens, each
    window fed M tokens (so a later window sees the previous window's last token as context).
    moecore's evaluator on the stream ``[EOS] + tokens(doc)`` with ``seq_len = M + 1`` and
    ``stride = M`` builds exactly those windows; only the last, partial window differs
    (lm-eval left-pads it with up to M tokens of earlier context). We sum NLL over the
    documents on both sides and divide by the same token count.
    """
    model, tok = tiny_mixtral(seed=3)
    M = 64
    out = run_lm_eval(model, tok, ["moecore_heldout_ppl"], limit=2, max_length=M, log_samples=True)
    samples = out["samples"]["moecore_heldout_ppl"]
    assert len(samples) == 2
    docs = [json.loads(line)["text"] for line in (TASKS_DIR / "heldout_ppl.jsonl").read_text().splitlines()[:2]]
    ll_sum = sum(float(s["resps"][0][0]) for s in samples)
    n_tok = nll_sum = 0.0
    for text in docs:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        stream = torch.tensor([tok.eos_token_id] + ids)
        r = perplexity(model, tok, stream=stream, seq_len=M + 1, stride=M, progress=False)
        assert r.tokens_scored == len(ids)
        n_tok += len(ids)
        nll_sum += r.nll * r.tokens_scored
    ppl_lm_eval, ppl_own = math.exp(-ll_sum / n_tok), math.exp(nll_sum / n_tok)
    print(f"lm-eval {ppl_lm_eval:.4f} own {ppl_own:.4f}")
    assert ppl_lm_eval == pytest.approx(ppl_own, rel=0.01)
    # lm-eval's own word perplexity is the same log-likelihood over words
    words = sum(len(t.split()) for t in docs)
    wp = summarize(out)["moecore_heldout_ppl"]["word_perplexity"]
    assert wp == pytest.approx(math.exp(-ll_sum / words), rel=1e-6)


def test_multiple_choice_task_and_cli_for_all_model_kinds(tmp_path, capsys):
    orig = save_tiny(tmp_path / "orig", seed=4)
    model, tok = tiny_mixtral(seed=4)
    moecore.compress(model, CompressionConfig(form="delta", rank=4))
    comp = moecore.save_compressed(model, tmp_path / "comp", tokenizer=tok)
    dense = moecore.export_dense(model, tmp_path / "dense", tokenizer=tok)
    results = {}
    for name, d in (("orig", orig), ("comp", comp), ("dense", dense)):
        assert main(["eval", str(d), "--tasks", "moecore_heldout_ppl,moecore_heldout_mc", "--limit", "3",
                     "--max-length", "128", "--json"]) == 0
        res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["results"]
        assert 0.0 <= res["moecore_heldout_mc"]["acc"] <= 1.0
        assert res["moecore_heldout_mc"]["sample_len"] == 3
        results[name] = res["moecore_heldout_ppl"]["word_perplexity"]
    # the dense export computes the same function as the compressed model
    assert results["dense"] == pytest.approx(results["comp"], rel=1e-4)
    assert results["orig"] != pytest.approx(results["comp"], rel=1e-6)
    assert main(["eval", str(orig), "--tasks", " , "]) == 2


def test_eval_bad_task_and_seq_len_are_one_line_errors(capsys, root):
    """An unknown task is refused before the model loads; a window longer than the model's
    positions is refused instead of evaluating garbage positions."""
    bundled = str(root / "models" / "tiny-mixtral")
    assert main(["eval", bundled, "--tasks", "nonexistent_task,moecore_heldout_ppl"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moecore eval: error: unknown lm-eval task(s): nonexistent_task (")
    assert main(["eval", bundled, "--seq-len", "4096", "--max-tokens", "8192"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1:]  # after transformers' loading bar
    assert err == ["moecore eval: error: seq_len 4096 is longer than the model's 1024 positions "
                   "(max_position_embeddings)"]
