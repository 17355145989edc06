"""``moecore export DIR -o OUT``: a dense, standard transformers checkpoint (no moecore needed)."""
from __future__ import annotations

from pathlib import Path

from moecore.cli.common import resolve_device, torch_dtype
from moecore.export import export_checkpoint
from moecore.io_utils import prepare_output
from moecore.io_utils import say as status


def run(args) -> int:
    out = Path(args.output)
    device = resolve_device(args.device)
    prepare_output(out, [args.model_dir], args.overwrite)
    dtype = torch_dtype(args.dtype)
    status(f"materializing dense experts into {out}, one layer at a time on {device}")
    export_checkpoint(args.model_dir, out, dtype=None if dtype == "auto" else dtype, device=device,
                      overwrite=args.overwrite)
    print(f"exported dense model to {out}")
    return 0
