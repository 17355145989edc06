"""Sliding-window perplexity with a pinned protocol.

The texts are tokenized, joined with EOS into one stream, and scored with windows of
``seq_len`` tokens that advance by ``stride``: every token after the first window is
predicted with at least ``seq_len - stride`` tokens of context, and each token is
scored exactly once (the Hugging Face "perplexity of fixed-length models" recipe).
"""
from __future__ import annotations

import inspect
import math
from collections import Counter
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..data import check_token_stream, token_stream  # token_stream re-exported as moecore.evaluation.token_stream
from ..errors import ConfigError, DataError
from ..progress import progress_bar

# The protocol every recorded perplexity in this project uses.
PPL_PROTOCOL = {"seq_len": 256, "stride": 128, "split": "heldout", "dtype": "float32"}


@dataclass
class PerplexityResult:
    """Perplexity plus everything needed to reproduce it."""
    ppl: float
    nll: float            # mean negative log-likelihood per scored token (nats)
    tokens_scored: int
    tokens_total: int
    seq_len: int
    stride: int

    def as_dict(self) -> dict:
        return asdict(self)


def _windows(n: int, seq_len: int, stride: int):
    """Yield (begin, end, n_new): window [begin, end) scores its last n_new tokens."""
    prev_end = 0
    for begin in range(0, n, stride):
        end = min(begin + seq_len, n)
        n_new = end - prev_end
        if end - begin > 1 and n_new > 0:
            yield begin, end, n_new
        prev_end = end
        if end == n:
            break


@torch.no_grad()
def perplexity(model, tokenizer, texts: list[str] | None = None, *, stream: torch.Tensor | None = None,
               seq_len: int = PPL_PROTOCOL["seq_len"], stride: int = PPL_PROTOCOL["stride"],
               batch_size: int = 16, max_tokens: int | None = None, progress: bool = True) -> PerplexityResult:
    """Perplexity of ``model`` on ``texts`` (or a pre-tokenized ``stream``).

    Computed in the model's dtype; log-softmax in float32. ``max_tokens`` truncates the
    stream (for quick checks; recorded results use the whole held-out split); ``None`` means
    all, and ``0`` is an error, not "unset".  Texts (not a given ``stream``) are checked for a
    degenerate token stream (:func:`moecore.data.check_token_stream`).
    """
    if stride <= 0 or seq_len <= 1 or stride > seq_len:
        raise ConfigError(f"need 0 < stride <= seq_len and seq_len > 1, got seq_len={seq_len}, stride={stride}")
    if max_tokens is not None and max_tokens <= 0:
        raise ConfigError(f"max_tokens must be > 0 (or None for all), got {max_tokens}")
    if stream is not None:
        ids = stream
    else:  # a broken tokenizer must not yield a perplexity of EOS / unknown tokens
        ids = check_token_stream(token_stream(tokenizer, texts or []), tokenizer, "the evaluation text")
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise DataError("need at least two tokens to compute perplexity")
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(positions, int) and seq_len > positions:
        raise ConfigError(f"seq_len {seq_len} is longer than the model's {positions} positions "
                          "(max_position_embeddings)")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    wins = list(_windows(len(ids), seq_len, stride))
    keep_ok = "logits_to_keep" in inspect.signature(model.forward).parameters  # transformers' causal LMs
    nll_sum, count = 0.0, 0
    bar = progress_bar(total=len(wins), desc="perplexity", unit="win", enabled=progress, leave=False)
    i = 0
    while i < len(wins):
        # batch windows of identical length (all but the last are full)
        j = i
        while j < len(wins) and j - i < batch_size and (wins[j][1] - wins[j][0]) == (wins[i][1] - wins[i][0]):
            j += 1
        x = torch.stack([ids[b:e] for b, e, _ in wins[i:j]]).to(device)  # (B, L)
        # only the positions that predict a scored token need logits (the lm head and the
        # log-softmax over the vocabulary are a large part of a small model's forward)
        kw = {"logits_to_keep": 1 + max(min(n, e - b - 1) for b, e, n in wins[i:j])} if keep_ok else {}
        logits = model(input_ids=x, **kw).logits.float()  # (B, K, V): the last K positions (K = L without kw)
        logp = F.log_softmax(logits[:, :-1], dim=-1)  # (B, K-1, V)
        tok_nll = -logp.gather(-1, x[:, x.shape[1] - logits.shape[1] + 1:, None]).squeeze(-1)  # (B, K-1)
        for row, (b, e, n_new) in zip(tok_nll, wins[i:j]):
            n_new = min(n_new, e - b - 1)  # the stream's first token has no prediction
            nll_sum += row[-n_new:].double().sum().item()
            count += n_new
        bar.update(j - i)
        i = j
    bar.close()
    model.train(was_training)
    nll = nll_sum / count
    return PerplexityResult(ppl=math.exp(nll), nll=nll, tokens_scored=count, tokens_total=len(ids),
                            seq_len=seq_len, stride=stride)


def unigram_perplexity(train_stream: torch.Tensor, eval_stream: torch.Tensor, vocab_size: int) -> float:
    """Perplexity of an add-one-smoothed unigram model fit on ``train_stream`` (the baseline)."""
    counts = Counter(train_stream.tolist())
    total = len(train_stream) + vocab_size
    nll = -sum(math.log((counts.get(t, 0) + 1) / total) for t in eval_stream[1:].tolist())
    return math.exp(nll / (len(eval_stream) - 1))
