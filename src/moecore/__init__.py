"""moecore: compress Mixture-of-Experts LLMs into a shared core per projection plus
small per-expert low-rank factors.

``import moecore`` also registers the ``"moecore"`` quantization method with transformers,
so ``AutoModelForCausalLM.from_pretrained(dir)`` loads compressed checkpoints natively.
"""
from . import hf_integration as _hf_integration  # noqa: F401  (registers the quantizer)
from .api import compress, compress_checkpoint
from .config import CompressionConfig
from .io import export_dense, save_compressed
from .planning import plan
from .stats import statistics
from .version import __version__

__all__ = ["__version__", "compress", "compress_checkpoint", "CompressionConfig", "statistics", "save_compressed", "export_dense", "plan"]
