"""The corpus splits and the tokenizer."""
from transformers import AutoTokenizer

from moecore.data import SPLITS, load_split, split_ids, split_of

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
