"""``moecore eval MODEL_DIR``: held-out perplexity with the pinned protocol, or
lm-evaluation-harness tasks on the in-process model with ``--tasks``; its flags are
:class:`~moecore.config.EvalConfig`'s fields."""
from __future__ import annotations

import json
import sys

from moecore.config import EvalConfig
from moecore.data import TextFile, load_split
from moecore.evaluation import PPL_PROTOCOL, perplexity
from moecore.evaluation.lm_eval_tasks import check_tasks, format_table, run_lm_eval, summarize
from moecore.modeling import load_model

from ._config_args import config_from_args
from .common import placement, resolve_device, torch_dtype


def _load(args, cfg: EvalConfig):
    """The model (on ``cfg.device``, in ``cfg.dtype``) and its tokenizer.  A model larger than
    the CUDA device's free memory is loaded with ``device_map="auto"`` (spread over the GPUs,
    then host memory; :func:`~.common.placement`), and says so."""
    device = resolve_device(cfg.device)  # a bad device is an error before the (slow) load
    dtype = torch_dtype(cfg.dtype)
    where = placement(args.model_dir, device, dtype)
    if where:
        print(f"moecore eval: {args.model_dir} does not fit {device}'s free memory: loading it with "
              f"device_map=\"auto\" (every GPU, then host memory)", file=sys.stderr, flush=True)
    model, tok = load_model(args.model_dir, dtype=dtype, **where)
    return (model if where else model.to(device)), tok


def run(args) -> int:
    cfg = config_from_args(EvalConfig, args)
    if cfg.tasks:
        return run_tasks(args, cfg)
    texts = TextFile(args.text) if args.text else None
    model, tok = _load(args, cfg)
    texts = texts if texts is not None else load_split(cfg.split)
    seq_len = cfg.seq_len if cfg.seq_len is not None else PPL_PROTOCOL["seq_len"]
    stride = cfg.stride if cfg.stride is not None else min(PPL_PROTOCOL["stride"], seq_len)
    res = perplexity(model, tok, texts, seq_len=seq_len, stride=stride, max_tokens=cfg.max_tokens)
    out = {"model": args.model_dir, "data": args.text or cfg.split, **res.as_dict()}
    if args.json:
        print(json.dumps({**out, "config": cfg.to_dict()}))
    else:
        print(f"{args.model_dir}: perplexity {res.ppl:.3f} on {res.tokens_scored} tokens of {out['data']} "
              f"(seq_len {res.seq_len}, stride {res.stride})")
    return 0


def run_tasks(args, cfg: EvalConfig) -> int:
    """``--tasks``: lm-eval's ``simple_evaluate`` on the loaded model (original, compressed or dense)."""
    names = check_tasks(cfg.tasks)  # before the (slow) model load
    model, tok = _load(args, cfg)
    limit = cfg.limit if cfg.limit is None or cfg.limit < 1 else int(cfg.limit)
    res = run_lm_eval(model, tok, names, limit=limit, batch_size=cfg.batch_size,
                      max_length=cfg.max_length, num_fewshot=cfg.num_fewshot)
    table = summarize(res)
    if args.json:
        print(json.dumps({"model": args.model_dir, "tasks": names, "limit": limit, "results": table,
                          "config": cfg.to_dict()}))
    else:
        print(f"{args.model_dir}: lm-eval {','.join(names)}" + (f" (limit {limit})" if limit else ""))
        print(format_table(table))
    return 0
