"""The bundled corpus and its deterministic train / calibration / held-out split.

User text files are streamed (:class:`TextFile`), and :func:`calibration_sequences` tokenizes
only what calibration needs, so memory stays bounded for any file size.

The corpus (``moecore/resources/corpus.jsonl.xz``, package data found through
:mod:`importlib.resources`, built by ``scripts/build_corpus.py``) is a list of
documents ``{"id", "source", "text"}``. Each document's split is a pure function of its
id (SHA-256 bucket), so the split never changes and held-out text is never read by
training or calibration code: they call :func:`load_split` with ``"train"`` or ``"calib"``.
"""
from __future__ import annotations

import hashlib
import importlib.resources
import json
import lzma
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from .errors import ConfigError, DataError, FileAccessError
from .io_utils import user_path

SPLITS = ("train", "calib", "heldout")
# Buckets out of 1000: [0, 80) held-out, [80, 100) calibration, the rest train.
_HELDOUT_END, _CALIB_END = 80, 100


def default_corpus() -> Path:
    """The bundled corpus, shipped as package data (works from a wheel or a source tree)."""
    return Path(str(importlib.resources.files("moecore") / "resources" / "corpus.jsonl.xz"))


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
        raise FileAccessError(f"corpus not found: {p} (build it with scripts/build_corpus.py)")
    with lzma.open(p, "rt", encoding="utf-8") as f:
        return tuple(json.loads(line) for line in f if line.strip())


def load_split(split: str, corpus: str | Path | None = None) -> list[str]:
    """Texts of one split, in corpus order."""
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; expected one of {SPLITS}")
    docs = _documents(str(corpus or default_corpus()))
    return [d["text"] for d in docs if split_of(d["id"]) == split]


def split_ids(split: str, corpus: str | Path | None = None) -> list[str]:
    """Document ids of one split (used to check that splits are disjoint)."""
    docs = _documents(str(corpus or default_corpus()))
    return [d["id"] for d in docs if split_of(d["id"]) == split]


class TextFile:
    """A re-iterable, streamed source of documents from a user file (nothing is read until
    iterated, and only one document is held at a time):

    - ``.txt``: documents separated by a blank line (``"\\n\\n"``), stripped, empty ones skipped;
      a document longer than :attr:`PIECE` characters comes in pieces of about that size,
      cut at whitespace, so memory is bounded by the chunk, not by the document;
    - ``.jsonl`` / ``.jsonl.xz``: one JSON object per line with a string ``"text"`` field
      (a line is parsed whole: keep texts of many megabytes in a ``.txt`` file).

    A bad line (invalid JSON, no ``text``, a non-string ``text``) or undecodable bytes raise one
    :class:`~moecore.errors.DataError` naming the file and line; a file with no text raises
    ``DataError("... holds no text")`` when iterated.
    """

    CHUNK = 1 << 20  # characters read at a time from a .txt file
    PIECE = 1 << 20  # the most characters of one document held at a time (longer ones come in pieces)

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise FileAccessError(f"no such file: {self.path}")
        if self.path.is_dir():
            raise FileAccessError(f"{self.path} is a directory, not a text file")
        if not self.path.is_file():  # a FIFO, a socket, /dev/zero: no end, or not re-readable
            raise FileAccessError(f"{self.path} is not a regular file (a pipe or a device?): save the text "
                                  "to a file first")
        self.jsonl = ".jsonl" in self.path.name
        self._len: int | None = None

    def __repr__(self) -> str:
        return f"TextFile({str(self.path)!r})"

    def _open(self):
        opener = lzma.open if self.path.suffix == ".xz" else open
        return opener(self.path, "rt", encoding="utf-8")

    def _iter_jsonl(self, f) -> Iterator[str]:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{self.path}:{n}: not valid JSON ({exc.msg})") from exc
            text = row.get("text") if isinstance(row, dict) else None
            if not isinstance(text, str):
                what = "no \"text\" field" if not isinstance(row, dict) or "text" not in row else \
                    f"\"text\" is a {type(text).__name__}, not a string"
                raise DataError(f"{self.path}:{n}: {what}")
            if text.strip():
                yield text

    def _iter_txt(self, f) -> Iterator[str]:
        buf = ""  # equivalent to raw.split("\n\n") on the whole file, one chunk at a time
        while chunk := f.read(self.CHUNK):
            parts = (buf + chunk).split("\n\n")
            buf = parts.pop()
            for t in parts:
                if t.strip():
                    yield t.strip()
            while len(buf) > self.PIECE:  # a document longer than PIECE: its head goes out, cut at whitespace
                cut = max(buf.rfind(" ", 0, self.PIECE), buf.rfind("\n", 0, self.PIECE))
                cut = cut if cut > 0 else self.PIECE
                if buf[:cut].strip():
                    yield buf[:cut].strip()
                buf = buf[cut:]
        if buf.strip():
            yield buf.strip()

    def __iter__(self) -> Iterator[str]:
        found = False
        try:
            with user_path(self.path), self._open() as f:
                for text in (self._iter_jsonl(f) if self.jsonl else self._iter_txt(f)):
                    found = True
                    yield text
        except (UnicodeDecodeError, lzma.LZMAError, EOFError) as exc:
            raise DataError(f"{self.path}: cannot read it as UTF-8 text: {exc}") from exc
        if not found:
            raise DataError(f"{self.path} holds no text")

    def __len__(self) -> int:
        """Number of documents (one streamed pass, cached)."""
        if self._len is None:
            self._len = sum(1 for _ in self)
        return self._len


def token_stream(tokenizer: Any, texts: Iterable[str], min_tokens: int | None = None) -> torch.Tensor:
    """Tokenize texts and join them with EOS into one (N,) int64 stream (the one tokenize-and-join
    routine: calibration, evaluation and training all read text through it).

    ``min_tokens``: stop reading texts once the stream holds at least this many tokens (the
    last text is kept whole; slice the result for an exact length)."""
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for t in texts:
        if not t.strip():
            continue
        ids.extend(tokenizer(t, add_special_tokens=False, verbose=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if min_tokens is not None and len(ids) >= min_tokens:
            break
    if not ids:
        raise DataError("no text to tokenize")
    return torch.tensor(ids, dtype=torch.long)


def check_token_stream(stream: torch.Tensor, tokenizer: Any, what: str = "text") -> torch.Tensor:
    """``DataError`` if a token stream is degenerate: mostly one token id (e.g. EOS only, from an
    empty tokenizer) or mostly the unknown token.  Returns ``stream``."""
    n = stream.numel()
    if n >= 16:
        counts = torch.bincount(stream)
        top = int(counts.argmax())
        share = float(counts[top]) / n
        unk = getattr(tokenizer, "unk_token_id", None)
        if share > 0.5 or (unk is not None and unk < counts.numel() and counts[unk] > n // 2):
            name = "EOS" if top == tokenizer.eos_token_id else ("unknown" if top == unk else f"id {top}")
            raise DataError(f"{what} tokenizes to {100 * share:.0f}% {name} tokens ({n} tokens): the tokenizer "
                            f"({getattr(tokenizer, 'name_or_path', '?')}) does not fit this text or is broken")
    return stream


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


# Above this many estimated tokens per budget token, calibration samples character windows
# instead of tokenizing everything; 4 characters per token is the estimate.
SMALL_TEXT_FACTOR = 4
CHARS_PER_TOKEN = 4
WINDOW_CHARS_PER_TOKEN = 16  # characters read per wanted token in a window (generous: BPE is ~4)


def _as_source(source: str | Iterable[str]) -> Iterable[str]:
    if isinstance(source, str):
        return [source]
    if isinstance(source, bytes) or not hasattr(source, "__iter__"):
        raise ConfigError(f"calibration must be texts or a TextFile, got {type(source).__name__}")
    return source


def _checked(source: Iterable[str]) -> Iterator[str]:
    for t in source:
        if not isinstance(t, str):
            raise ConfigError(f"calibration must be a list of strings, got an item of type {type(t).__name__}")
        if t.strip():
            yield t


def calibration_sequences(source: str | Iterable[str], tokenizer: Any, max_tokens: int,
                          seq_len: int) -> list[torch.Tensor]:
    """Calibration sequences ``[(seq_len,), ...]`` holding at most ``max_tokens`` tokens, drawn
    evenly over the WHOLE source (a list of texts or a re-iterable :class:`TextFile`).

    Small text (at most ``SMALL_TEXT_FACTOR * max_tokens`` estimated tokens, at
    ``CHARS_PER_TOKEN`` characters each; the bundled calibration split is one): exactly
    ``spread_sequences(token_stream(...))``.  Larger text: ``max_tokens // seq_len`` evenly
    spaced character windows of the source (documents joined with EOS as in the stream)
    are tokenized, each dropping its first (possibly cut) token, so memory and time do not
    grow with the file.  Raises ``ConfigError`` for empty text, ``DataError`` for a
    degenerate token stream (e.g. a broken tokenizer).
    """
    if max_tokens <= 0 or seq_len <= 0:
        raise ConfigError(f"need max_tokens > 0 and seq_len > 0, got {max_tokens}, {seq_len}")
    source = _as_source(source)
    if iter(source) is source:  # a one-shot iterator: two passes are needed
        source = list(source)
    total = sum(len(t) for t in _checked(source))  # one streamed pass
    if total == 0:
        raise ConfigError("calibration text is empty: it yields no tokens")
    if total <= SMALL_TEXT_FACTOR * CHARS_PER_TOKEN * max_tokens:
        stream = check_token_stream(token_stream(tokenizer, _checked(source)), tokenizer, "calibration text")
        return spread_sequences(stream, max_tokens, seq_len)
    n_win = max(1, max_tokens // seq_len)
    width = min(total, seq_len * WINDOW_CHARS_PER_TOKEN)
    starts = torch.linspace(0, total - width, n_win).round().long().unique().tolist()
    seqs = [_window_ids(pieces, tokenizer)[:seq_len] for pieces in _windows(_checked(source), starts, width)]
    check_token_stream(torch.cat(seqs), tokenizer, "calibration text")
    left, out = max_tokens, []
    for s in seqs:
        if left <= 0:
            break
        out.append(s[:left])
        left -= out[-1].numel()
    return out


def _windows(texts: Iterable[str], starts: list[int], width: int) -> Iterator[list[str]]:
    """For sorted character offsets ``starts`` into the documents laid end to end, yield each
    window's pieces (one per document it touches), streaming over the documents once."""
    open_wins: list[tuple[int, list[str]]] = []  # (start, pieces) of windows not yet complete
    nxt, pos = 0, 0
    for t in texts:
        end = pos + len(t)
        while nxt < len(starts) and starts[nxt] < end:
            open_wins.append((starts[nxt], []))
            nxt += 1
        still = []
        for s, pieces in open_wins:
            a, b = max(s, pos) - pos, min(s + width, end) - pos
            if b > a:
                pieces.append(t[a:b])
            if s + width <= end:
                yield pieces
            else:
                still.append((s, pieces))
        open_wins, pos = still, end
    for _, pieces in open_wins:
        yield pieces


def _window_ids(pieces: list[str], tokenizer: Any) -> torch.Tensor:
    ids: list[int] = []
    for k, piece in enumerate(pieces):
        if k:
            ids.append(tokenizer.eos_token_id)  # a document boundary, as in token_stream
        ids.extend(tokenizer(piece, add_special_tokens=False, verbose=False)["input_ids"])
    return torch.tensor(ids[1:] if len(ids) > 1 else ids, dtype=torch.long)
