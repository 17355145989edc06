"""``moecore distill --teacher ORIG [--student STUDENT] -o OUT``: logit distillation."""
from __future__ import annotations


def register(sub) -> None:
    from .compress_cmd import add_budget_args

    p = sub.add_parser("distill", help="recover a compressed student by logit distillation from the original")
    p.add_argument("--teacher", required=True, help="original model directory")
    p.add_argument("--student", help="compressed (or plain) student directory; default: compress the teacher "
                   "on the fly with --form/--rank/--target-ratio")
    p.add_argument("-o", "--output", required=True, help="output directory (checkpoints, final/, curves)")
    p.add_argument("--data", help="training text (.txt / .jsonl); default: the bundled train split")
    add_budget_args(p)
    p.add_argument("--max-steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--temperature", type=float, default=1.0, help="KD temperature T (loss uses T^2 * KL)")
    p.add_argument("--alpha", type=float, default=0.1, help="weight of the cross-entropy term")
    p.add_argument("--block-size", type=int, default=128, help="tokens per packed training block")
    p.add_argument("--batch-size", type=int, default=8, help="blocks per step and process")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--save-steps", type=int, default=50, help="checkpoint every N steps (and at the end)")
    p.add_argument("--save-total-limit", type=int, default=None, help="keep only the last N checkpoints")
    p.add_argument("--logging-steps", type=int, default=10)
    p.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint in -o")
    p.add_argument("--train-core", action="store_true", help="also train the shared cores")
    p.add_argument("--train-router", action="store_true", help="also train the routers")
    p.add_argument("--recover-steps", type=int, default=0,
                   help="run layer-wise local recovery (this many Adam steps per layer) before KD")
    p.add_argument("--eval-async", action="store_true", help="evaluate each checkpoint in a background process")
    p.add_argument("--eval-max-tokens", type=int, default=16384, help="held-out tokens per async evaluation")
    p.add_argument("--eval-tasks", help="also run these lm-eval tasks on each checkpoint (comma-separated)")
    p.add_argument("--eval-limit", type=int, default=None, help="documents per lm-eval task")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args) -> int:
    from moecore.io_utils import check_output_path
    from moecore.training import distill

    check_output_path(args.output, [args.teacher, args.student, args.data])  # before any heavy work

    compression = None
    if args.rank is not None or args.target_ratio is not None or args.student is None:
        from moecore import CompressionConfig

        from moecore.cli.compress_cmd import quant_arg

        compression = CompressionConfig(form=args.form, rank=args.rank, target_ratio=args.target_ratio,
                                        allocation=args.allocation, quant=quant_arg(args))
    student = args.student
    if args.recover_steps and not args.resume:
        student = _recovered_student(args, compression)
    res = distill(args.teacher, student, args.output, compression=compression, data=args.data,
                  max_steps=args.max_steps, lr=args.lr, temperature=args.temperature, alpha=args.alpha,
                  block_size=args.block_size, batch_size=args.batch_size, grad_accum=args.grad_accum,
                  save_steps=args.save_steps, save_total_limit=args.save_total_limit,
                  logging_steps=args.logging_steps, warmup_steps=args.warmup_steps, resume=args.resume,
                  train_core=args.train_core, train_router=args.train_router, eval_async=args.eval_async,
                  eval_max_tokens=args.eval_max_tokens,
                  eval_tasks=args.eval_tasks.split(",") if args.eval_tasks else None,
                  eval_limit=args.eval_limit, seed=args.seed)
    if res.final_eval_loss is not None:  # the main process
        last = "n/a" if res.train_loss is None else f"{res.train_loss:.4f}"
        print(f"moecore distill: {res.global_step} steps, last logged loss {last}, "
              f"final eval KD loss {res.final_eval_loss:.4f}; student saved to {res.final_dir}")
    return 0


def _recovered_student(args, compression):
    """Load (or compress) the student in memory and run layer-wise recovery on it first."""
    import copy

    from moecore.training import recover
    from moecore.modeling import load_model
    from moecore.training.common import is_compressed_model

    if args.student:
        model = load_model(args.student)[0]
    else:
        model = copy.deepcopy(load_model(args.teacher)[0])
    if compression is not None and not is_compressed_model(model):
        from moecore import compress
        from moecore.data import load_split
        from transformers import AutoTokenizer

        compress(model, compression, calibration=load_split("calib"), tokenizer=AutoTokenizer.from_pretrained(args.teacher))
    rep = recover(args.teacher, model, steps=args.recover_steps)
    for row in rep.layers:
        print(f"moecore recover: {row['path']}: relative MSE {row['rel_mse_before']:.4g} -> {row['rel_mse_after']:.4g}")
    return model
