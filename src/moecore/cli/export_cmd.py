"""``moecore export DIR -o OUT``: a dense, standard transformers checkpoint (no moecore needed)."""
from __future__ import annotations

from pathlib import Path

from moecore.cli.common import resolve_device, torch_dtype
from moecore.io_utils import say as status
from moecore.io import export_dense
from moecore.io_utils import prepare_output
from moecore.modeling import load_model


def run(args) -> int:
    out = Path(args.output)
    device = resolve_device(args.device)
    prepare_output(out, [args.model_dir], args.overwrite)
    status(f"loading {args.model_dir}")
    model, tok = load_model(args.model_dir, dtype=torch_dtype(args.dtype), need_tokenizer=False)
    model.to(device)  # the experts are materialized there, then saved
    status(f"materializing dense experts into {out}")
    export_dense(model, out, tokenizer=tok, overwrite=args.overwrite)
    print(f"exported dense model to {out}")
    return 0
