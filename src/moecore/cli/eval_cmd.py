"""``moecore eval MODEL_DIR``: held-out perplexity with the pinned protocol, or
lm-evaluation-harness tasks on the in-process model with ``--tasks``."""
from __future__ import annotations

import json

from moecore.data import TextFile, load_split
from moecore.errors import ConfigError
from moecore.evaluation import PPL_PROTOCOL, perplexity
from moecore.evaluation.lm_eval_tasks import check_tasks, format_table, run_lm_eval, summarize
from moecore.modeling import load_model


def _check_positive(args) -> None:
    for name in ("seq_len", "stride", "max_tokens", "limit", "batch_size", "max_length"):
        v = getattr(args, name, None)
        if v is not None and v <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {v}")


def run(args) -> int:
    _check_positive(args)
    if args.tasks:
        return run_tasks(args)
    texts = TextFile(args.text) if args.text else None
    model, tok = load_model(args.model_dir)
    texts = texts if texts is not None else load_split(args.split)
    seq_len = args.seq_len if args.seq_len is not None else PPL_PROTOCOL["seq_len"]
    stride = args.stride if args.stride is not None else min(PPL_PROTOCOL["stride"], seq_len)
    res = perplexity(model, tok, texts, seq_len=seq_len, stride=stride, max_tokens=args.max_tokens)
    out = {"model": args.model_dir, "data": args.text or args.split, **res.as_dict()}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{args.model_dir}: perplexity {res.ppl:.3f} on {res.tokens_scored} tokens of {out['data']} "
              f"(seq_len {res.seq_len}, stride {res.stride})")
    return 0


def run_tasks(args) -> int:
    """``--tasks``: lm-eval's ``simple_evaluate`` on the loaded model (original, compressed or dense)."""
    names = check_tasks(args.tasks)  # before the (slow) model load
    model, tok = load_model(args.model_dir)
    limit = args.limit if args.limit is None or args.limit < 1 else int(args.limit)
    res = run_lm_eval(model, tok, names, limit=limit, batch_size=args.batch_size,
                      max_length=args.max_length, num_fewshot=args.num_fewshot)
    table = summarize(res)
    if args.json:
        print(json.dumps({"model": args.model_dir, "tasks": names, "limit": limit, "results": table}))
    else:
        print(f"{args.model_dir}: lm-eval {','.join(names)}" + (f" (limit {limit})" if limit else ""))
        print(format_table(table))
    return 0
