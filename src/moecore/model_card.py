"""The model card (``README.md``) written into every compressed output: how to load it, what it
was compressed from, its statistics and its measured quality (when known).

The card opens with Hugging Face's YAML front matter (``library_name: moecore``, ``base_model``:
the source model, ``moecore_quality``: measured quality or ``null``), so the Hub shows it and
:func:`base_model_of` can read the source back when a compressed model is loaded and saved again
(recovery, distillation), keeping "compressed from" pointing at the original.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml

from .io_utils import atomic_write_text
from .version import __version__

CARD_FILENAME = "README.md"
_FRONT = re.compile(r"\A---\n(.*?)\n---\n", re.S)
_ROWS = (("params", "params", "compression_ratio"), ("active params / token", "active_params", "active_ratio"),
         ("multiply-adds / token", "macs", "macs_ratio"), ("bytes", "bytes", "bytes_ratio"))


def base_model_of(folder: str | os.PathLike) -> str | None:
    """The ``base_model`` recorded in ``folder``'s model card (``None`` without one)."""
    f = Path(folder) / CARD_FILENAME
    try:
        m = _FRONT.match(f.read_text(encoding="utf-8")) if f.is_file() else None
        meta = yaml.safe_load(m.group(1)) if m else None
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    value = meta.get("base_model") if isinstance(meta, dict) else None
    return str(value) if value else None


def _stats_rows(stats: dict[str, Any]) -> list[str]:
    rows = ["| | original | compressed | ratio |", "|---|---|---|---|"]
    for scope in ("experts", "model"):
        b = stats.get(scope) or {}
        for label, key, rkey in _ROWS:
            if f"{key}_original" in b:
                rows.append(f"| {scope}: {label} | {b[f'{key}_original']:,} | {b[f'{key}_compressed']:,} | "
                            f"{100 * b[rkey]:.1f}% |")
    return rows


def render_card(stats: dict[str, Any], *, source: str | None, config: dict[str, Any] | None = None,
                quality: dict[str, Any] | None = None) -> str:
    """The card's Markdown.  ``stats``: :func:`moecore.statistics`' dict; ``source``: the model it
    was compressed from; ``config``: the ``CompressionConfig`` as a dict; ``quality``: measured
    figures (e.g. ``{"heldout_ppl": 44.1, "original_heldout_ppl": 43.7}``) or ``None``."""
    front = {"library_name": "moecore", "tags": ["moecore", "mixture-of-experts", "compressed"],
             **({"base_model": source} if source else {}), "moecore_version": __version__,
             "moecore_quality": quality}
    form, ratio = stats.get("form"), stats.get("total_compression_ratio")
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
        # titled by the source, not the output folder: the same job gives the same bytes wherever it is written
        f"# {Path(source).name if source else 'model'} (moecore-compressed)", "",
        f"The experts of every MoE layer of `{source or 'an unrecorded model'}` "
        f"({stats.get('model_type')}, {stats.get('num_moe_layers')} MoE layers, top-{stats.get('top_k')}) "
        f"compressed by [moecore](https://pypi.org/project/moecore/) {__version__} into one shared core plus "
        f"low-rank per-expert factors ({form} form), keeping "
        + (f"{100 * ratio:.1f}% of the expert parameters." if isinstance(ratio, (int, float)) else
           "part of the expert parameters."), "",
        "## How to load", "",
        "```bash", "pip install moecore", "```", "",
        "```python",
        "import moecore  # registers the \"moecore\" quantization method with transformers",
        "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
        "model = AutoModelForCausalLM.from_pretrained(\"PATH_TO_THIS_FOLDER\")",
        "tok = AutoTokenizer.from_pretrained(\"PATH_TO_THIS_FOLDER\")", "```", "",
        "Without `import moecore`, transformers cannot build the compressed experts and refuses the "
        "checkpoint (its load report names `import moecore`). `moecore export THIS_FOLDER -o DENSE` writes a "
        "plain checkpoint of the original architecture that loads anywhere, at the original size.", "",
        "## Compressed from", "",
        f"- source: `{source or 'unknown'}`",
        "- compression config (`moecore_config.json`): "
        + (", ".join(f"{k}={v!r}" for k, v in sorted(config.items()) if k != "format_version")
           if config else "unknown (model not made by `moecore.compress`)"), "",
        "## Statistics", "",
        "Counted from the stored tensors (`compression_statistics.yaml`, `moecore stats THIS_FOLDER`):", "",
        *_stats_rows(stats), "",
        "## Measured quality", "",
    ]
    if quality:
        lines += [f"- {k}: {v}" for k, v in quality.items()]
    else:
        lines += ["Not measured when this folder was written (`moecore_quality: null` above). "
                  "`moecore eval THIS_FOLDER` measures held-out perplexity; record it in `moecore_quality`."]
    return "\n".join(lines) + "\n"


def write_model_card(folder: str | os.PathLike, stats: dict[str, Any], *, source: str | None,
                     config: dict[str, Any] | None = None, quality: dict[str, Any] | None = None) -> Path:
    """Write ``folder/README.md`` atomically (see :func:`render_card`); returns its path."""
    path = Path(folder) / CARD_FILENAME
    atomic_write_text(path, render_card(stats, source=source, config=config, quality=quality))
    return path
