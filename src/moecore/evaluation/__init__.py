"""Evaluation: held-out perplexity with a pinned protocol (and lm-evaluation-harness tasks)."""
from .perplexity import PPL_PROTOCOL, PerplexityResult, perplexity, token_stream, unigram_perplexity

__all__ = ["PPL_PROTOCOL", "PerplexityResult", "perplexity", "token_stream", "unigram_perplexity"]
