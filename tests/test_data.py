"""The corpus splits and the tokenizer."""
import os
import subprocess
import sys

from transformers import AutoTokenizer

import torch

from moecore.evaluation.perplexity import perplexity
from moecore.data import SPLITS, load_split, split_ids, split_of, spread_sequences, token_stream

from ._tiny_models import tiny_mixtral, tokenizer
from .conftest import ROOT


def test_splits_are_disjoint_and_cover_corpus():
    ids = {s: set(split_ids(s)) for s in SPLITS}
    assert ids["train"].isdisjoint(ids["calib"])
    assert ids["train"].isdisjoint(ids["heldout"])
    assert ids["calib"].isdisjoint(ids["heldout"])
    assert all(split_of(i) == s for s in SPLITS for i in ids[s])
    assert len(ids["train"]) > 10 * len(ids["heldout"]) > 0


def test_split_is_deterministic():
    assert split_of("kjv/Ge1") == split_of("kjv/Ge1")
    assert [split_of(f"doc{i}") for i in range(50)] == [split_of(f"doc{i}") for i in range(50)]


def test_heldout_has_at_least_250k_tokens():
    tok = AutoTokenizer.from_pretrained(ROOT / "data" / "tokenizer")
    n = sum(len(tok(t, verbose=False)["input_ids"]) for t in load_split("heldout"))
    assert n >= 250_000


def test_tokenizer_round_trips_text():
    tok = AutoTokenizer.from_pretrained(ROOT / "data" / "tokenizer")
    assert 4096 <= len(tok) <= 8192
    for text in ["In the beginning God created the heaven and the earth.",
                 "def f(x):\n\treturn x ** 2  # ünïcödé ✓\n", load_split("heldout")[0][:2000]]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text


def test_spread_sequences_cover_the_whole_stream():
    stream = torch.arange(10_000)
    seqs = spread_sequences(stream, 1000, 100)
    assert len(seqs) == 10 and all(s.numel() == 100 for s in seqs)
    starts = [int(s[0]) for s in seqs]
    assert starts[0] == 0 and starts[-1] == 9900 and starts == sorted(set(starts))  # head to tail, no repeats
    assert all(torch.equal(s, stream[s[0]: s[0] + 100]) for s in seqs)  # contiguous windows
    short = spread_sequences(stream[:250], 1000, 100)  # shorter than the budget: everything, in order
    assert torch.equal(torch.cat(short), stream[:250])


def test_calibration_budget_draws_every_source_of_the_calib_split():
    """The bundled calib split is stored in source order (KJV, Jargon, Python docs); a
    32k-token budget must still see all three in roughly their proportions."""
    tok = AutoTokenizer.from_pretrained(ROOT / "data" / "tokenizer")
    texts = load_split("calib")
    seqs = spread_sequences(token_stream(tok, texts), 32768, 512)
    assert sum(s.numel() for s in seqs) <= 32768
    text = tok.decode(torch.cat(seqs))
    kjv = sum(text.count(w) for w in (" LORD", " thee", " unto"))
    py = sum(text.count(w) for w in ("Python", "module", "()"))
    assert kjv > 100 and py > 150  # head truncation (the old behaviour) gives 460 and 24


def test_progress_bars_honour_tqdm_disable(capsys):
    """A bar asked for (progress=True) still obeys the user's TQDM_DISABLE (read by tqdm when
    it is imported, so in a fresh process); progress=False is off."""
    model, tok = tiny_mixtral()[0], tokenizer()
    stream = torch.arange(600) % 100
    perplexity(model, tok, stream=stream, seq_len=64, stride=32, progress=True)
    assert "perplexity" in capsys.readouterr().err  # the bar is shown by default
    perplexity(model, tok, stream=stream, seq_len=64, stride=32, progress=False)
    assert capsys.readouterr().err == ""
    code = ("from moecore.progress import progress_bar\n"
            "for _ in progress_bar(range(3), desc='visible-bar', enabled=True): pass\n")
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "visible-bar" in shown.stderr
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "TQDM_DISABLE": "1"})
    assert off.stderr == ""
