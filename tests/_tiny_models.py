"""Tiny random MoE models for the training / evaluation tests (built from configs, no download)."""
from __future__ import annotations

from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = ROOT / "data" / "tokenizer"


def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def tiny_mixtral(seed: int = 0, hidden: int = 64, layers: int = 2, experts: int = 4):
    """A random MixtralForCausalLM with the bundled tokenizer's vocabulary."""
    from transformers import MixtralConfig, MixtralForCausalLM

    tok = tokenizer()
    cfg = MixtralConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                        num_local_experts=experts, num_experts_per_tok=2, max_position_embeddings=512,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return MixtralForCausalLM(cfg).eval(), tok


def save_tiny(path: Path, seed: int = 0, **kw) -> Path:
    """Save a tiny random Mixtral and the tokenizer to ``path``; returns ``path``."""
    model, tok = tiny_mixtral(seed, **kw)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def python_cmd(*args: str) -> list[str]:
    """argv that runs ``moecore.cli.main(args)`` in a fresh interpreter."""
    import sys

    return [sys.executable, "-c", "import sys; from moecore.cli import main; sys.exit(main(sys.argv[1:]))", *args]


def subprocess_env(threads: int = 1) -> dict:
    import os

    return {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}


def stored_expert_tensors(folder: Path, model) -> dict[str, torch.Tensor]:
    """The experts tensors a saved single-file checkpoint stores, without the load guards
    (``moecore.checkpoint_format.load_guards``: not expert storage)."""
    from safetensors import safe_open

    from moecore.checkpoint_format import load_guards

    guards = set(load_guards(model))
    with safe_open(str(Path(folder) / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if ".experts." in k and k not in guards}


def stored_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def reload_bit_identical(model, folder: Path):
    """``from_pretrained(folder)``, asserting its logits on fixed ids equal ``model``'s bit for bit; returns it."""
    from transformers import AutoModelForCausalLM

    ids = torch.arange(1, 33)[None]
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, loaded(ids).logits)
    return loaded
