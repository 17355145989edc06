"""``moecore eval MODEL_DIR``: held-out perplexity with the pinned protocol."""
from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("eval", help="held-out perplexity (and lm-eval tasks) of a model directory")
    p.add_argument("model_dir")
    p.add_argument("--split", default="heldout", choices=["heldout", "calib"], help="bundled-corpus split")
    p.add_argument("--text", help="evaluate this text file (.txt / .jsonl) instead of the bundled split")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--stride", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=None, help="truncate the token stream (quick checks)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from moecore.data import load_split, read_text_file
    from moecore.evaluation import PPL_PROTOCOL, perplexity
    from moecore.modeling import load_model

    model, tok = load_model(args.model_dir)
    texts = read_text_file(args.text) if args.text else load_split(args.split)
    res = perplexity(model, tok, texts, seq_len=args.seq_len or PPL_PROTOCOL["seq_len"],
                     stride=args.stride or PPL_PROTOCOL["stride"], max_tokens=args.max_tokens)
    out = {"model": args.model_dir, "data": args.text or args.split, **res.as_dict()}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{args.model_dir}: perplexity {res.ppl:.3f} on {res.tokens_scored} tokens of {out['data']} "
              f"(seq_len {res.seq_len}, stride {res.stride})")
    return 0
