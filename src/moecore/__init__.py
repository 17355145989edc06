"""moecore: compress Mixture-of-Experts LLMs into a shared core per projection plus
small per-expert low-rank factors.

``import moecore`` also registers the ``"moecore"`` quantization method with transformers,
so ``AutoModelForCausalLM.from_pretrained(dir)`` loads compressed checkpoints natively.
"""
from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("moecore")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+local"

from . import hf_integration as _hf_integration  # noqa: E402,F401  (registers the quantizer)
from .api import compress, compress_checkpoint  # noqa: E402
from .config import CompressionConfig  # noqa: E402
from .io import export_dense, save_compressed  # noqa: E402
from .stats import plan, statistics  # noqa: E402

__all__ = ["__version__", "compress", "compress_checkpoint", "CompressionConfig", "statistics", "save_compressed", "export_dense", "plan"]
