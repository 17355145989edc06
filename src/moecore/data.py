"""The bundled corpus and its deterministic train / calibration / held-out split.

The corpus (``data/corpus.jsonl.xz``, built by ``scripts/build_corpus.py``) is a list of
documents ``{"id", "source", "text"}``. Each document's split is a pure function of its
id (SHA-256 bucket), so the split never changes and held-out text is never read by
training or calibration code: they call :func:`load_split` with ``"train"`` or ``"calib"``.
"""
from __future__ import annotations

import hashlib
import json
import lzma
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

SPLITS = ("train", "calib", "heldout")
# Buckets out of 1000: [0, 80) held-out, [80, 100) calibration, the rest train.
_HELDOUT_END, _CALIB_END = 80, 100


def repo_root() -> Path:
    """The source checkout that holds ``data/`` and ``models/`` (moecore is installed editable)."""
    return Path(__file__).resolve().parents[2]


def default_corpus() -> Path:
    return repo_root() / "data" / "corpus.jsonl.xz"


def split_of(doc_id: str) -> str:
    """The split ('train', 'calib' or 'heldout') a document id belongs to."""
    bucket = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big") % 1000
    if bucket < _HELDOUT_END:
        return "heldout"
    return "calib" if bucket < _CALIB_END else "train"


@lru_cache(maxsize=4)
def _documents(path: str) -> tuple[dict, ...]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"corpus not found: {p} (build it with scripts/build_corpus.py)")
    with lzma.open(p, "rt", encoding="utf-8") as f:
        return tuple(json.loads(line) for line in f if line.strip())


def load_split(split: str, corpus: str | Path | None = None) -> list[str]:
    """Texts of one split, in corpus order."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    docs = _documents(str(corpus or default_corpus()))
    return [d["text"] for d in docs if split_of(d["id"]) == split]


def split_ids(split: str, corpus: str | Path | None = None) -> list[str]:
    """Document ids of one split (used to check that splits are disjoint)."""
    docs = _documents(str(corpus or default_corpus()))
    return [d["id"] for d in docs if split_of(d["id"]) == split]


def read_text_file(path: str | Path) -> list[str]:
    """Calibration / training texts from a user file: .txt (blank-line separated documents),
    .jsonl (a ``text`` field per line) or .jsonl.xz. Raises ValueError when it holds no text."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such file: {p}")
    opener = lzma.open if p.suffix == ".xz" else open
    with opener(p, "rt", encoding="utf-8") as f:
        raw = f.read()
    if ".jsonl" in p.name:
        texts = [json.loads(line)["text"] for line in raw.splitlines() if line.strip()]
    else:
        texts = [t.strip() for t in raw.split("\n\n")]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError(f"{p} holds no text")
    return texts


def token_stream(tokenizer: Any, texts: list[str]) -> torch.Tensor:
    """Tokenize texts and join them with EOS into one (N,) int64 stream."""
    if not texts or not any(t.strip() for t in texts):
        raise ValueError("no text to evaluate")
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False, verbose=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def spread_sequences(stream: torch.Tensor, max_tokens: int, seq_len: int) -> list[torch.Tensor]:
    """Cut ``stream (N,)`` into ``(seq_len,)`` sequences (the last may be shorter) holding at
    most ``max_tokens``; when the stream is longer, the sequences are drawn **evenly across
    all of it** rather than from its head.

    A corpus stored in source order would otherwise calibrate on one source only: the
    bundled calibration split's first 32k tokens are 72% KJV while the whole split is 65%
    Python docs, and head-truncated calibration made activation-aware init and layer-wise
    recovery fit the wrong distribution.
    """
    seqs = list(stream.split(seq_len))
    keep = max(1, max_tokens // seq_len)
    if stream.numel() > max_tokens and len(seqs) > keep:
        full = [s for s in seqs if s.numel() == seq_len] or seqs
        picks = torch.linspace(0, len(full) - 1, min(keep, len(full))).round().long().unique().tolist()
        seqs = [full[i] for i in picks]
    return [s[:max_tokens] for s in seqs]
