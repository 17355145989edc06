"""``compress(model, config, calibration=, tokenizer=)``: the public verb (in memory).

It runs the layer engine (:mod:`moecore.engine`) over a model that is already loaded: per
decoder layer, the original layer runs on the current calibration activations with a hook
that keeps what reaches its experts, the core and factors are fitted
(:mod:`moecore.fitting`), the experts module is swapped for a
:class:`~moecore.compressed_experts.CompressedExperts`, and the compressed layer produces the
next layer's inputs (``propagate="compressed"``, sequential calibration) or the original
layer's outputs do (``"original"``, the default).  ``moecore compress DIR -o OUT`` runs the same engine streamed from and
to sharded safetensors (:mod:`moecore.streaming`).
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Sequence

import torch
from torch import nn

from . import streaming
from .checkpoint_reader import read_config
from .config import CompressionConfig
from .data import calibration_sequences
from .engine import Engine, InMemoryStore
from .heap import bounded_host_heap
from .errors import ConfigError, DataFreeWarning, MemoryWarning
from .hf_integration import mark_compressed
from .io_utils import model_source, prepare_output
from .modeling import TOKENIZER_FILES, check_model_dir, load_tokenizer
from .planning import memory_shortfall
from .resume import published_state


def _calibration_ids(texts: Sequence[str], tokenizer: Any, cfg: CompressionConfig) -> list[torch.Tensor]:
    """Calibration sequences ``[(calib_seq_len,), ...]`` holding at most ``calib_max_tokens``,
    drawn evenly over the whole text (:func:`moecore.data.calibration_sequences`: small text is
    tokenized whole into the EOS-joined stream the evaluator scores; a large file or
    :class:`~moecore.data.TextFile` is sampled in windows, so memory stays bounded).
    """
    if tokenizer is None:
        raise ConfigError("calibration text needs a tokenizer (compress(..., tokenizer=tok))")
    return calibration_sequences(texts, tokenizer, cfg.calib_max_tokens, cfg.calib_seq_len)


DATA_FREE_WARNING = (
    "moecore: no calibration text, so the data-free init is used (at 25% of the expert parameters it lost "
    "+13.0% perplexity on tiny-mixtral against +3.3% calibrated, benchmarks/RESULTS.md section 3): pass "
    "calibration=moecore.data.load_split('calib') (the bundled English corpus) or text like your use, with "
    "tokenizer=; CompressionConfig(init='svd') chooses the data-free init and silences this warning")


def check_calibration_options(config: CompressionConfig, have_calibration: bool) -> None:
    """Options that need calibration text raise ``ConfigError`` without it; ``init="auto"``
    without it warns (:class:`~moecore.errors.DataFreeWarning`, shown once per call site)."""
    if not isinstance(config, CompressionConfig):
        raise ConfigError(f"config must be a CompressionConfig, got {type(config).__name__}")
    if config.init == "whitened" and not have_calibration:
        raise ConfigError("init='whitened' needs calibration text")
    if config.core in ("frequency", "output") and not have_calibration:
        raise ConfigError(f"core={config.core!r} needs calibration text (router statistics)")
    if config.init == "auto" and not have_calibration:
        warnings.warn(DATA_FREE_WARNING, DataFreeWarning, stacklevel=3)


def compress(
    model: nn.Module, config: CompressionConfig, calibration: Sequence[str] | None = None, tokenizer: Any = None,
    *, device: torch.device | str | None = None, progress: bool = True,
) -> nn.Module:
    """Compress every MoE layer's experts of ``model`` in place and return ``model``.

    Args:
        model: a transformers MoE model (fused 3-D experts; see :mod:`moecore.families`).
        config: a :class:`~moecore.config.CompressionConfig`.
        calibration: texts (a list of strings or a :class:`~moecore.data.TextFile`): enables the
            activation-whitened init (``init="auto"|"whitened"``), the frequency-weighted core
            and output-space errors.  Use text like the model's real use, about 32k tokens
            (``calib_max_tokens``; README "Calibration" has the measured effect of the count);
            ``moecore.data.load_split("calib")`` is the bundled English corpus, what
            ``moecore compress`` uses when no ``--calib`` is given.  ``None`` (the default) keeps
            the data-free init: the library does not pick text for you, but with
            ``init="auto"`` it warns once (:class:`~moecore.errors.DataFreeWarning`);
            ``CompressionConfig(init="svd")`` asks for the data-free init explicitly.
        tokenizer: required with ``calibration``.
        device: where each layer is calibrated and fitted (default: where the model is).  A
            model kept in host memory can be compressed on one GPU: each decoder layer visits
            the device and goes back.
        progress: show a progress bar.

    The router, shared experts, attention, router-logit recording and aux loss are left
    untouched; ``model.moecore_config`` is set to ``config`` and ``model.config`` gets the
    ``quantization_config``, so ``model.save_pretrained(dir)`` round-trips.  Raises
    ``ConfigError`` for a bad budget (naming the projection) and ``UnsupportedModelError``
    for a non-MoE model or an experts layout moecore can't handle.
    """
    have_calib = calibration is not None
    check_calibration_options(config, have_calib)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    seqs = _calibration_ids(calibration, tokenizer, config) if have_calib else None
    was_training = model.training
    model.eval()
    try:
        with bounded_host_heap():
            engine = Engine(model, config, InMemoryStore(device), seqs, device, progress=progress)
            if config.rank is not None:  # fail fast on shapes before any calibration run
                engine.solve(None)
            hidden = engine.first_inputs()
            ranks = engine.solve(hidden)
            engine.run(ranks, hidden)
    finally:
        model.train(was_training)
    model.moecore_config = config
    if getattr(model, "moecore_source", None) is None:  # for the model card of save_compressed
        model.moecore_source = model_source(model)
    mark_compressed(model)  # a plain model.save_pretrained(dir) now round-trips like save_compressed
    return model


def compress_checkpoint(
    model_dir: str | os.PathLike, out_dir: str | os.PathLike, config: CompressionConfig,
    calibration: Sequence[str] | None = None, *, device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = "auto", resume: bool = False, overwrite: bool = False,
    progress: bool = True, calibration_path: str | os.PathLike | None = None, max_shard_size: int | str = "5GB",
) -> dict[str, Any]:
    """Compress the checkpoint in ``model_dir`` into ``out_dir`` layer by layer, never holding
    more than one decoder layer of original weights (plus embeddings and head); the same
    engine as :func:`compress` (see :mod:`moecore.streaming`).

    Args:
        model_dir: a transformers model folder (``config.json`` + safetensors, sharded or not).
        out_dir: the output folder (sharded safetensors + index); it appears only when complete.
        config: the :class:`~moecore.config.CompressionConfig`.
        calibration: texts or a :class:`~moecore.data.TextFile`; ``calibration_path`` names its
            file so that it is protected from being overwritten.  ``None``: the data-free init,
            with a :class:`~moecore.errors.DataFreeWarning` under ``init="auto"`` (as
            :func:`compress`; the CLI passes the bundled corpus instead unless ``--no-calib``).
        device: where each layer is calibrated and fitted.
        dtype: load / store dtype (``"auto"``: the checkpoint's).
        resume: continue an interrupted run of the same job from its first unfinished layer.
        overwrite: replace an existing ``out_dir`` (never an input).
        max_shard_size: as in ``save_pretrained``: a result up to this size is one
            ``model.safetensors``; a larger one keeps one shard per decoder layer plus
            ``model.safetensors.index.json``.
    Returns a summary: output path, ranks, per-layer timings, the block recovery reports of
    the layers compressed by this call (``recover_steps``), whether it resumed.
    """
    src = check_model_dir(model_dir)
    # a run killed just after publishing left its state file in the complete output: --resume tidies it
    out = prepare_output(out_dir, [src, calibration_path], overwrite or (resume and published_state(out_dir) is not None))
    have_calib = calibration is not None
    check_calibration_options(config, have_calib)
    tok = None
    if have_calib or any((src / f).is_file() for f in TOKENIZER_FILES):
        tok = load_tokenizer(src, read_config(src))
    seqs = _calibration_ids(calibration, tok, config) if have_calib else None
    short = memory_shortfall(src, config, torch.device(device), None if dtype in (None, "auto") else dtype)
    if short:
        warnings.warn(short, MemoryWarning, stacklevel=2)
    return streaming.run(src, out, config, seqs, tok, device=torch.device(device), dtype=dtype, resume=resume,
                         overwrite=overwrite, progress=progress, max_shard_size=max_shard_size)
