"""THE model and tokenizer loader of moecore (every command and library path uses it).

:func:`load_model` validates the directory and every safetensors header first, loads with
``output_loading_info=True`` and refuses, with one :class:`~moecore.errors.CheckpointError`
naming the directory:
- any tensor transformers reports missing (e.g. an MoE ``config.json`` next to dense weights:
  transformers would randomly initialise the experts and only log a report);
- stored moecore tensors the model did not take (a ``quantization_config`` that does not
  list a layer whose compressed tensors are in the checkpoint), and shape mismatches;
- a tokenizer that does not fit the model (:func:`load_tokenizer`).
``trust_remote_code`` is never set: no code from a checkpoint runs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PretrainedConfig
from transformers.utils import logging as hf_logging

from . import checkpoint_format
from .checkpoint_reader import read_config
from .errors import CheckpointError, first_line
from .families import config_dtype, text_config

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
# the shape of the load guard stored under an original experts key (checkpoint_format.load_guards)
_GUARD_SHAPE = (len(checkpoint_format.LOAD_NOTICE_KEY.encode()),)


def check_model_dir(path: str | os.PathLike) -> Path:
    """Return ``path`` if it looks like a Hugging Face model directory, else raise CheckpointError."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"model directory not found: {p}")
    if not p.is_dir() or not (p / "config.json").is_file():
        raise CheckpointError(f"not a model directory (no config.json): {p}")
    if not any(p.glob("*.safetensors")):
        raise CheckpointError(f"no safetensors weights in {p}")
    return p


def check_safetensors(folder: str | os.PathLike) -> list[Path]:
    """Open every ``*.safetensors`` file in ``folder`` (header + size check); ``CheckpointError``
    naming the file if one is missing, truncated or corrupt."""

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no safetensors weights in {folder}")
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as fh:
                fh.keys()
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"corrupt safetensors file {f}: {first_line(exc)}") from exc
    return files


def load_tokenizer(path: str | os.PathLike, config=None):
    """``AutoTokenizer`` of ``path``, checked against the model ``config``: it must exist, have
    more than one token, an EOS token, and no more tokens than the model's vocabulary (nor
    fewer than half of it).  ``CheckpointError`` naming the directory otherwise."""

    p = Path(path)
    if not any((p / f).is_file() for f in TOKENIZER_FILES):
        raise CheckpointError(f"no tokenizer in {p} (none of {', '.join(TOKENIZER_FILES)})")
    try:
        tok = AutoTokenizer.from_pretrained(p)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"no usable tokenizer in {p}: {first_line(exc)}") from exc
    n = len(tok)
    if n <= 1:
        raise CheckpointError(f"the tokenizer in {p} is empty ({n} token): its files are missing or broken")
    if tok.eos_token_id is None:
        raise CheckpointError(f"the tokenizer in {p} has no EOS token")
    vocab = getattr(text_config(config), "vocab_size", None) if config else None
    if vocab:
        if n > vocab:
            raise CheckpointError(f"the tokenizer in {p} has {n} tokens but the model's vocabulary has {vocab}")
        if n < vocab // 2:
            raise CheckpointError(f"the tokenizer in {p} has {n} tokens, far fewer than the model's vocabulary "
                                  f"of {vocab}: it is not this model's tokenizer")
    return tok


def _check_loading_info(p: Path, info: dict) -> None:
    # a load guard (checkpoint_format.load_guards) met by original experts: that layer's weights are missing
    guards = {k for k in info.get("mismatched_keys") or () if tuple(k[1]) == _GUARD_SHAPE}
    missing = sorted({*(info.get("missing_keys") or ()), *(k[0] for k in guards)})
    if missing:
        raise CheckpointError(f"{p} lacks {len(missing)} tensor(s) the model needs, e.g. {missing[0]} "
                              "(weights that don't match config.json?)")
    mismatched = sorted(set(info.get("mismatched_keys") or ()) - guards)
    if mismatched:
        k = mismatched[0]
        raise CheckpointError(f"{p}: tensor {k[0]} has shape {tuple(k[1])}, the model expects {tuple(k[2])}")
    stray = sorted(k for k in info.get("unexpected_keys") or () if checkpoint_format.is_moecore_key(k))
    if stray:
        raise CheckpointError(f"{p} stores compressed tensors that its quantization_config does not cover, "
                              f"e.g. {stray[0]}")


def load_model(path: str | os.PathLike, dtype: torch.dtype | str = torch.float32, *, need_tokenizer: bool = True,
               **kwargs):
    """``(model, tokenizer)`` from a model directory, compressed or not (``tokenizer`` is None
    when ``need_tokenizer=False`` and the folder holds none).  The model is in eval mode.

    Importing moecore registers its quantization method, so compressed checkpoints load the
    same way as plain ones.  Raises ``CheckpointError`` for a missing directory, corrupt or
    truncated safetensors, missing tensors, uncovered compressed tensors or a bad tokenizer.
    """


    p = check_model_dir(path)
    check_safetensors(p)

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # transformers' multi-line LOAD REPORT: we raise one line instead
    try:
        # mismatched sizes are reported in `info` and refused below, in one line
        model, info = AutoModelForCausalLM.from_pretrained(p, dtype=dtype, output_loading_info=True,
                                                           **{"ignore_mismatched_sizes": True, **kwargs})
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
        raise CheckpointError(f"could not load model from {p}: {first_line(exc)}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    _check_loading_info(p, info)
    model.eval()
    has_tok = any((p / f).is_file() for f in TOKENIZER_FILES)
    tok = load_tokenizer(p, model.config) if (need_tokenizer or has_tok) else None
    return model, tok


@dataclass
class MetaCheckpoint:
    """A saved model folder opened without reading its weights (:func:`load_meta`)."""

    path: Path
    files: list[Path]  # its safetensors files, headers checked
    config: PretrainedConfig  # without ``quantization_config`` (that is ``quantization``)
    dtype: torch.dtype  # the dtype ``config.json`` records
    quantization: dict | None  # the moecore ``quantization_config``, or None (not compressed)
    model: nn.Module  # on the meta device, compressed experts swapped in from ``quantization``
    swapped: dict[str, nn.Module]  # path -> meta compressed experts module


def load_meta(path: str | os.PathLike) -> MetaCheckpoint:
    """The model of a saved folder on the meta device (no weights read, at any scale): built
    from ``config.json`` in its recorded dtype, its compressed layers rebuilt from the
    ``quantization_config`` and every stored moecore tensor's shape checked against them
    (:func:`moecore.checkpoint_format.check_stored_headers`).  ``stats --recompute`` and the
    streamed ``export`` start here."""
    p = check_model_dir(path)
    files = check_safetensors(p)
    hf = read_config(p)
    qc = getattr(hf, "quantization_config", None)
    qdict = None if qc is None else (qc if isinstance(qc, dict) else qc.to_dict())
    if qc is not None:
        del hf.quantization_config
    dtype = config_dtype(hf)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf, dtype=dtype)
    swapped = {}
    if qdict is not None:
        swapped = checkpoint_format.swap_in_compressed(model, qdict)
        checkpoint_format.check_stored_headers(model, files, swapped)
    return MetaCheckpoint(p, files, hf, dtype, qdict, model, swapped)
