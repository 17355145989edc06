"""Loading models and tokenizers from a directory, with clear errors for bad paths."""
from __future__ import annotations

from pathlib import Path

import torch

from .errors import CheckpointError


def check_model_dir(path: str | Path) -> Path:
    """Return ``path`` if it looks like a Hugging Face model directory, else raise CheckpointError."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"model directory not found: {p}")
    if not p.is_dir() or not (p / "config.json").is_file():
        raise CheckpointError(f"not a model directory (no config.json): {p}")
    if not any(p.glob("*.safetensors")):
        raise CheckpointError(f"no safetensors weights in {p}")
    return p


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, **kwargs):
    """``AutoModelForCausalLM.from_pretrained`` plus the tokenizer, after validating the directory.

    Importing moecore first registers its quantization method, so compressed checkpoints
    load the same way as plain ones.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = check_model_dir(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(p, dtype=dtype, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"could not load model from {p}: {first}") from exc
    try:
        tok = AutoTokenizer.from_pretrained(p)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"no usable tokenizer in {p}: {exc}") from exc
    model.eval()
    return model, tok
