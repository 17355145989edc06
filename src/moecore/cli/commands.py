"""The arguments of every ``moecore`` sub-command, torch-free: ``moecore --help``,
``moecore CMD --help`` and a mistyped flag are answered from this module, the config
dataclasses (:mod:`moecore.config`) and :mod:`argparse` alone.

Each ``add_*`` function adds one sub-command and names the module that runs it
(``set_defaults(module=...)``): ``moecore.cli.<module>.run(args)``, imported by
:func:`moecore.cli.main` only once the command line has parsed.  The compression, distillation,
recovery and evaluation flags are derived from the config dataclasses' fields
(:mod:`moecore.cli._config_args`); only inputs, outputs and run options are listed here.
"""
from __future__ import annotations

import argparse
import dataclasses

from moecore.config import LOAD_DTYPES, CompressionConfig, DistillConfig, EvalConfig, RecoveryConfig

from ._config_args import add_config_args

DTYPES = LOAD_DTYPES
# the CompressionConfig fields that ``plan`` and ``distill`` (compressing on the fly) take as flags
BUDGET_FIELDS = ("form", "rank", "target_ratio", "allocation", "quant", "allow_larger")


#: the flags of ``moecore compress --help``'s "essential options" group taken from CompressionConfig
ESSENTIAL_FIELDS = ("form", "rank", "target_ratio")
GLOSSARY = ("Terms used here (expert, core, factor, rank, calibration, whitening, Gram, routing weight, ...) "
            "are explained in docs/GLOSSARY.md of the moecore source.")
ESSENTIAL, ADVANCED = "essential options", "advanced options (the defaults suit most models)"


def add_compress(sub) -> None:
    """``moecore compress MODEL -o OUT`` (run by :mod:`moecore.cli.compress_cmd`); its help has
    two groups, essential and advanced options, and every option shows its default."""
    p = sub.add_parser("compress", help="compress a model's experts (shared core + low-rank factors) and save it",
                       add_help=False, epilog=GLOSSARY,
                       description="Compress every Mixture-of-Experts layer of a model folder, one decoder layer "
                       "at a time, and save the result as a checkpoint that from_pretrained loads after "
                       "import moecore.")
    ess, adv = p.add_argument_group(ESSENTIAL), p.add_argument_group(ADVANCED)
    ess.add_argument("model", help="model folder: config.json + safetensors (required)")
    ess.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder; it appears only when "
                     "complete (required)")
    ess.add_argument("--calib", metavar="FILE", help="calibration text (.txt / .jsonl / .jsonl.xz): the fit then "
                     "minimises the error on the activations this text produces instead of the plain weight error "
                     "(default: the bundled English corpus's calibration split; use text like your use)")
    ess.add_argument("--no-calib", action="store_true", help="no calibration: the data-free init (plain truncated "
                     "SVD of the weights; measurably worse) (default: off)")
    add_config_args(p, CompressionConfig, only=ESSENTIAL_FIELDS, group=ess)
    ess.add_argument("--dtype", choices=DTYPES, default="auto", help="dtype to load and store the model in "
                     "(default: auto: the checkpoint's)")
    ess.add_argument("--device", default="auto", help="where layers are calibrated and fitted: auto (cuda if "
                     "available), cpu, cuda, cuda:1, ... (default: auto)")
    ess.add_argument("--resume", action="store_true", help="continue an interrupted run of the same job from its "
                     "first unfinished layer (default: off)")
    ess.add_argument("--overwrite", action="store_true", help="replace an existing output folder, or discard an "
                     "interrupted run's work folder (default: off)")
    ess.add_argument("-h", "--help", action="help", help="show this help and exit")
    adv.add_argument("--quiet", action="store_true", help="no statistics table at the end (default: off)")
    add_config_args(p, CompressionConfig, group=adv,
                    only=[f.name for f in dataclasses.fields(CompressionConfig) if f.name not in ESSENTIAL_FIELDS])
    p.set_defaults(module="compress_cmd")


def add_stats(sub) -> None:
    """``moecore stats DIR`` (run by :mod:`moecore.cli.stats_cmd`)."""
    p = sub.add_parser("stats", help="print compression statistics of a model directory")
    p.add_argument("model_dir")
    p.add_argument("--recompute", action="store_true",
                   help="count the model's tensors instead of reading compression_statistics.yaml: built on the "
                        "meta device from config.json and the safetensors headers (no weights are read, so it needs "
                        "no GPU and no memory at any model size)")
    p.add_argument("--per-layer", action="store_true", help="also print one row per layer and projection")
    p.add_argument("--json", action="store_true", help="print the statistics as JSON")
    p.set_defaults(module="stats_cmd")


def add_plan(sub) -> None:
    """``moecore plan CONFIG.json ...`` (run by :mod:`moecore.cli.plan_cmd`)."""
    p = sub.add_parser("plan", help="statistics of a compression from config.json alone (no weights)")
    p.add_argument("configs", nargs="+", metavar="CONFIG.json", help="transformers config.json (or its folder)")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPES[1:], help="dtype of the output whose size on "
                   "disk and memory are estimated (default: bfloat16)")
    p.add_argument("--per-layer", action="store_true", help="also print one row per layer and projection")
    p.add_argument("--json", action="store_true", help="print the plans as JSON")
    add_config_args(p, CompressionConfig, only=BUDGET_FIELDS)
    p.set_defaults(module="plan_cmd")


def add_export(sub) -> None:
    """``moecore export DIR -o OUT`` (run by :mod:`moecore.cli.export_cmd`)."""
    p = sub.add_parser("export", help="write a compressed model as a standard dense transformers checkpoint")
    p.add_argument("model_dir", help="moecore-compressed model directory")
    p.add_argument("-o", "--output", required=True, help="output directory")
    p.add_argument("--dtype", choices=DTYPES, default="auto")
    add_device_arg(p, "where the dense experts are materialized")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(module="export_cmd")


def add_eval(sub) -> None:
    """``moecore eval MODEL_DIR`` (run by :mod:`moecore.cli.eval_cmd`)."""
    p = sub.add_parser("eval", help="held-out perplexity (and lm-eval tasks) of a model directory")
    p.add_argument("model_dir")
    p.add_argument("--text", help="evaluate this text file (.txt / .jsonl) instead of the bundled split")
    p.add_argument("--json", action="store_true", help="print the result (and the eval config) as JSON")
    add_config_args(p, EvalConfig)
    p.set_defaults(module="eval_cmd")


def add_distill(sub) -> None:
    """``moecore distill --teacher ORIG [--student STUDENT] -o OUT`` (run by :mod:`moecore.cli.distill_cmd`)."""
    p = sub.add_parser("distill", help="recover a compressed student by logit distillation from the original")
    p.add_argument("--teacher", required=True, help="original model directory")
    p.add_argument("--student", help="compressed (or plain) student directory; default: compress the teacher "
                   "on the fly with --form/--rank/--target-ratio")
    p.add_argument("-o", "--output", required=True, help="output directory (checkpoints, final/, curves)")
    p.add_argument("--data", help="training text (.txt / .jsonl); default: the bundled train split")
    p.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint in -o")
    add_config_args(p, DistillConfig)
    add_config_args(p, CompressionConfig, only=BUDGET_FIELDS,
                    title="compression of a plain student (or of the teacher without --student)")
    p.set_defaults(module="distill_cmd")


def add_device_arg(p, what: str) -> None:
    """``--device`` of the commands that run a model (``eval`` has it from its config)."""
    p.add_argument("--device", default="auto", help=f"{what}: auto (cuda if available, else cpu), cpu, cuda, "
                   "cuda:1, ... (default: auto)")


def add_recover(sub) -> None:
    """``moecore recover --teacher ORIG --student STUDENT -o OUT`` (run by :mod:`moecore.cli.recover_cmd`)."""
    p = sub.add_parser("recover", help="fit each compressed experts block to the original block's outputs")
    p.add_argument("--teacher", required=True, help="original model directory (read one layer at a time)")
    p.add_argument("--student", required=True, help="compressed student directory")
    p.add_argument("-o", "--output", required=True, help="where to save the recovered student")
    p.add_argument("--calib", help="calibration text (.txt / .jsonl); default: the bundled calib split")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--json", action="store_true", help="print the per-layer report as JSON")
    p.add_argument("--dtype", choices=LOAD_DTYPES, default="float32",
                   help="dtype the student is loaded and trained in (default: float32)")
    add_device_arg(p, "where the teacher's layers and the student run")
    add_config_args(p, RecoveryConfig)
    p.set_defaults(module="recover_cmd")


#: the sub-commands, in the order ``moecore --help`` lists them
COMMANDS = [add_compress, add_stats, add_plan, add_export, add_eval, add_distill, add_recover]


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add every sub-command to ``sub`` (the top-level parser's sub-parsers)."""
    for add in COMMANDS:
        add(sub)
