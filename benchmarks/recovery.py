"""Recovery figures (issue 4 item 7): held-out perplexity of a bundled model at a given share
of expert parameters, zero-shot, after layer-wise recovery, and after KD with a fixed step
budget (about 20 CPU-minutes on this machine), each step as its own reproducible stage.

Usage (one model per process; the two models can run side by side with --threads 1):
  python benchmarks/recovery.py tiny-mixtral --ratio 0.25 --kd-steps 600 --threads 1
Writes runs/recovery-NAME/ (compressed, recovered and distilled checkpoints, KD curves) and
benchmarks/results/recovery-NAME.json.

``--in-engine``: the compressed stage is the default config (zero-shot fit plus in-engine
recovery, ``--form`` included) and there is no separate ``recover`` stage.  ``--kd-variants``:
KD runs, each from that same start, one per name (``factors``: the factors only, as §4;
``core``: and the cores; ``router``: and the routers; ``router-only``: the routers only,
arXiv 2603.02217; ``block``: the factors, with the loss on the MoE blocks' outputs as well as
the logits, weight 1); the results then go to ``recovery-NAME-TAG.json`` (``--tag``), rewritten
after every stage so an interrupted run keeps what it measured.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
import transformers

import moecore
from moecore.data import load_split
from moecore.evaluation import PPL_PROTOCOL, perplexity, token_stream
from moecore.forms import FORM_NAMES
from moecore.io_utils import atomic_write_text
from moecore.modeling import load_model
from moecore.training import DistillConfig, RecoveryConfig, distill, recover

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import provenance  # noqa: E402

REPO = Path(__file__).resolve().parents[1]  # the source checkout (bundled models, results)
#: what each KD variant trains, as DistillConfig fields
KD_VARIANTS = {"factors": {}, "core": {"train_core": True}, "router": {"train_router": True},
               "router-only": {"train_router": True, "train_factors": False}, "block": {"experts_loss_weight": 1.0}}


def heldout_ppl(path: Path, max_tokens: int | None) -> dict:
    model, tok = load_model(path)
    stream = token_stream(tok, load_split("heldout"))
    return perplexity(model, tok, stream=stream, max_tokens=max_tokens, progress=False).as_dict()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name")
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--form", default="delta", choices=list(FORM_NAMES))
    ap.add_argument("--in-engine", action="store_true",
                    help="compressed stage = the default config (in-engine recovery on), no separate recover stage")
    ap.add_argument("--kd-variants", nargs="+", default=["factors"], choices=list(KD_VARIANTS))
    ap.add_argument("--tag", default=None, help="results file recovery-NAME-TAG.json (default: recovery-NAME.json)")
    ap.add_argument("--recover-steps", type=int, default=200)
    ap.add_argument("--kd-steps", type=int, default=600)
    ap.add_argument("--kd-lr", type=float, default=5e-4)
    ap.add_argument("--kd-temperature", type=float, default=1.0)
    ap.add_argument("--kd-alpha", type=float, default=0.1)
    ap.add_argument("--kd-start", default="auto", choices=["auto", "zero-shot", "recovered"],
                    help="student KD starts from; auto: the one with the lower perplexity on the CALIBRATION "
                         "split (never the held-out one)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--eval-max-tokens", type=int, default=None, help="smoke runs only")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    orig = REPO / "models" / args.name
    stem = f"recovery-{args.name}" + (f"-{args.tag}" if args.tag else "")
    work = REPO / "runs" / stem
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rows = []

    cpu0 = [time.process_time()]

    def stage(label, path, seconds, **extra):
        cpu = time.process_time() - cpu0[0]  # CPU seconds of the stage's work (all threads), before its eval
        ppl = heldout_ppl(path, args.eval_max_tokens)
        rows.append({"stage": label, "dir": str(path.relative_to(REPO)), "ppl": ppl["ppl"],
                     "tokens_scored": ppl["tokens_scored"], "stage_seconds": round(seconds, 1),
                     "stage_cpu_seconds": round(cpu, 1), **extra})
        cpu0[0] = time.process_time()
        print(json.dumps(rows[-1]), flush=True)

    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.name, "form": args.form, "target_ratio": args.ratio, "protocol": PPL_PROTOCOL,
            "in_engine": args.in_engine, "kd_variants": {v: KD_VARIANTS[v] for v in args.kd_variants},
            "threads": torch.get_num_threads(), "kd": {"batch": 8, "block": 256, "lr": args.kd_lr, "warmup": args.kd_steps // 20,
                                                       "T": args.kd_temperature, "alpha": args.kd_alpha, "start": args.kd_start,
                                                       "data": "train split"},
            "versions": {"moecore": moecore.__version__, "torch": torch.__version__,
                         "transformers": transformers.__version__},
            "command": "python benchmarks/recovery.py " + " ".join(sys.argv[1:]),
            "provenance": provenance(config=vars(args))}

    def save() -> None:
        base = rows[0]["ppl"]
        for r in rows:
            r["ppl_change_percent"] = 100 * (r["ppl"] / base - 1)
        atomic_write_text(out / f"{stem}.json", json.dumps({"meta": meta, "rows": rows}, indent=1))

    stage("original", orig, 0.0)
    model, tok = load_model(orig)
    t0 = time.time()
    if args.in_engine:  # the default config: zero-shot fit and in-engine recovery in one pass
        cfg = moecore.CompressionConfig(form=args.form, target_ratio=args.ratio)
    else:  # the zero-shot stage of §4: the fit alone (no in-engine recovery, whose default is on since §3f)
        cfg = moecore.CompressionConfig(form=args.form, target_ratio=args.ratio, recover_steps=0)
    moecore.compress(model, cfg, calibration=load_split("calib"), tokenizer=tok)
    ratio = moecore.statistics(model)["total_compression_ratio"]
    first = "compressed" if args.in_engine else "zero-shot"
    moecore.save_compressed(model, work / first, tokenizer=tok)
    stage("compressed (default config, in-engine recovery)" if args.in_engine else "zero-shot (activation-aware)",
          work / first, time.time() - t0, expert_param_ratio=ratio, config=cfg.to_dict())
    save()

    starts = [first]
    if not args.in_engine:
        t0 = time.time()
        rep = recover(orig, model, RecoveryConfig(steps=args.recover_steps), calibration=load_split("calib"),
                      tokenizer=tok, progress=False)
        moecore.save_compressed(model, work / "recovered", tokenizer=tok)
        stage("layer-wise recovery", work / "recovered", time.time() - t0, recover_steps=args.recover_steps,
              layers=rep.as_dict()["layers"])
        save()
        starts.append("recovered")
    del model

    start = first if args.in_engine else args.kd_start
    calib_ppl = {}
    if start == "auto":  # model selection on calibration text only
        for name in starts:
            m, t = load_model(work / name)
            calib_ppl[name] = perplexity(m, t, stream=token_stream(t, load_split("calib")), progress=False).ppl
        start = min(calib_ppl, key=calib_ppl.get)
        print(json.dumps({"kd_start": start, "calib_ppl": calib_ppl}), flush=True)
    for variant in args.kd_variants:
        cpu0[0] = time.process_time()
        t0 = time.time()
        kd = DistillConfig(max_steps=args.kd_steps, save_steps=max(1, args.kd_steps // 3), batch_size=8,
                           block_size=256, lr=args.kd_lr, warmup_steps=args.kd_steps // 20,
                           temperature=args.kd_temperature, alpha=args.kd_alpha, logging_steps=25,
                           **KD_VARIANTS[variant])
        kd_dir = work / ("kd" if variant == "factors" else f"kd-{variant}")
        res = distill(str(orig), str(work / start), kd_dir, kd)
        label = f"KD (from {start})" if variant == "factors" else f"KD {variant} (from {start})"
        stage(label, Path(res.final_dir), time.time() - t0, kd_steps=args.kd_steps,
              kd_tokens=args.kd_steps * 8 * 256, kd_start=start, calib_ppl=calib_ppl, kd_variant=variant,
              trained=KD_VARIANTS[variant])
        save()
        curves = f"{stem}-kd-curves.png" if variant == "factors" else f"{stem}-kd-{variant}-curves.png"
        if (kd_dir / "training_curves.png").is_file():  # drawn once there are logged steps
            shutil.copy(kd_dir / "training_curves.png", out / curves)


if __name__ == "__main__":
    main()
