"""``moecore compress MODEL -o OUT``: compress a model directory's experts and save it.

Its arguments are declared in :mod:`moecore.cli.commands` (the compression flags derived from
:class:`~moecore.config.CompressionConfig`'s fields); this module runs the command (the ``--dtype`` / ``--device``
helpers every command shares are :mod:`moecore.cli.common`'s)."""
from __future__ import annotations

import json
import signal
import warnings
from pathlib import Path

from moecore.api import compress_checkpoint
from moecore.config import CompressionConfig
from moecore.data import TextFile, load_split
from moecore.errors import ConfigError, DataFreeWarning
from moecore.io_utils import say as status  # one stderr status line
from moecore.modeling import TOKENIZER_FILES
from moecore.resume import resume_hint
from moecore.stats import STATS_FILENAME, print_table, read_statistics_yaml

from ._config_args import config_from_args
from .common import resolve_device, sigterm_as_interrupt, torch_dtype


def next_steps(out: str) -> str:
    """The one line a finished compression ends with: how to evaluate and load the result."""
    return (f"next: moecore eval {out}   |   in Python: import moecore; from transformers import "
            f"AutoModelForCausalLM; model = AutoModelForCausalLM.from_pretrained({json.dumps(str(out))})")


def calibration_text(args, cfg: CompressionConfig):
    """What ``compress`` calibrates on: the ``--calib`` file (streamed), nothing with
    ``--no-calib``, else the bundled corpus's calibration split, said in one stderr line (also
    when the model folder has no tokenizer to calibrate with)."""
    if args.calib and args.no_calib:
        raise ConfigError("--calib and --no-calib exclude each other")
    if args.calib:
        return TextFile(args.calib)  # streamed: only what calibration needs is read
    if args.no_calib:
        return None
    if not any((Path(args.model) / f).is_file() for f in TOKENIZER_FILES):
        status(f"no tokenizer in {args.model}, so no calibration: the data-free init is used "
               "(add the tokenizer and pass --calib FILE for the activation-aware init)")
        return None
    status(f"calibrating on the bundled English corpus (up to {cfg.calib_max_tokens} tokens); pass --calib FILE "
           "for text like your use, or --no-calib for the data-free init")
    return load_split("calib")


def _status_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning raised while compressing, as one status line."""
    status(f"warning: {message}")


def run(args) -> int:
    """Stream the checkpoint through the layer engine (one decoder layer in memory at a time)."""
    cfg = config_from_args(CompressionConfig, args)  # validates rank / ratio before any heavy work
    device = resolve_device(args.device)
    calib = calibration_text(args, cfg)
    status(f"compressing {args.model} layer by layer on {device} ({cfg.form}, "
           + (f"rank {cfg.rank}" if cfg.rank else f"target ratio {cfg.target_ratio}")
           + (f", calibration from {args.calib}" if args.calib else "") + ")")
    with sigterm_as_interrupt() as got, warnings.catch_warnings():
        # the data-free init was chosen (--no-calib) or said above (no tokenizer)
        warnings.simplefilter("ignore", DataFreeWarning)
        warnings.showwarning = _status_warning  # e.g. MemoryWarning: one status line (restored on exit)
        try:
            res = compress_checkpoint(args.model, args.output, cfg, calib, device=device,
                                      dtype=torch_dtype(args.dtype), resume=args.resume, overwrite=args.overwrite,
                                      calibration_path=args.calib)
        except KeyboardInterrupt:
            status(resume_hint(args.output))
            return 128 + (got[0] if got else signal.SIGINT)
    t = res["timings"]
    if t:
        tot = {k: sum(r.get(k, 0.0) for r in t)
               for k in ("load_s", "calibrate_s", "fit_s", "recover_s", "propagate_s", "write_s")}
        status(f"{len(t)} layer(s) in {sum(tot.values()):.1f} s: " + ", ".join(
            f"{k[:-2]} {v:.1f} s" for k, v in tot.items() if v or k != "recover_s"))
    rec = res.get("recovery") or []
    if rec:
        kept = [r for r in rec if r["kept"]]
        status(f"block recovery ({cfg.recover_steps} steps per layer): kept in {len(kept)} of {len(rec)} layer(s); "
               f"held-out block error {sum(r['val_rel_mse_before'] for r in rec) / len(rec):.4g} -> "
               f"{sum(r['val_rel_mse_after'] for r in rec) / len(rec):.4g} (mean relative MSE)")
        chunked = [r for r in rec if "expert_chunks" in r]
        if chunked:
            status(f"{len(chunked)} layer(s) trained a chunk of experts at a time, factors only: their trained "
                   f"tensors exceed --recover-memory-gb {cfg.recover_memory_gb:g}")
    if not args.quiet:
        print_table(read_statistics_yaml(Path(res["output"]) / STATS_FILENAME), per_layer=False)
    print(f"saved compressed model to {args.output}")
    print(next_steps(args.output))
    return 0
