"""The typed, validated configurations of every verb: ``CompressionConfig`` (with its
``QuantConfig``) of :func:`moecore.compress`, ``DistillConfig`` of
:func:`moecore.training.distill`, ``RecoveryConfig`` of :func:`moecore.training.recover` and
``EvalConfig`` of ``moecore eval``.

Each is validated on creation (``ConfigError`` with a clear message), saved next to its
output as JSON together with the moecore version and its format version
(:class:`~moecore.config_base.ConfigBase`: ``moecore_config.json`` beside the weights,
``distill_config.json`` in the run folder, ``recovery_config.json`` in the recovered
checkpoint), and defines the flags of its command (``moecore compress``, ``plan``,
``distill``, ``recover``).  Checks that need the real model shapes (rank larger than
``min(d_in, d_out)``, an unreachable ``target_ratio``) happen in :mod:`moecore.maths.budget` /
:func:`moecore.compress`, naming the projection.

This module imports no torch (the command line's ``--help`` reads these classes): the form
names are :data:`moecore.forms.FORM_NAMES`, and the form objects are loaded only to validate a
config that asks for quantized storage.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from .config_base import ConfigBase
from .errors import ConfigError
from .forms import DEFAULT_FORM, FORM_NAMES, get_form, quantizable_forms

CONFIG_FILENAME = "moecore_config.json"


def registered_form(name: str) -> bool:
    """Whether ``name`` is a form added with :func:`moecore.forms.register_form` (the forms on
    disk are the ``choices``; this loads nothing that is not loaded yet)."""
    forms = importlib.import_module("moecore.forms")
    return name in vars(forms).get("FORMS", {})

QUANT_BITS = (2, 3, 4, 8)
QUANT_METHODS = ("hqq", "rtn")


@dataclass
class QuantConfig(ConfigBase):
    """Weight format of the stored core and factors (delta form; :mod:`moecore.quant`).

    Attributes:
        core_bits: bits per core weight (2, 3, 4 or 8), or ``None`` (on the command line: flag
            not given) to keep the core in float.
        factor_bits: bits per factor weight (2, 3, 4 or 8), or ``None`` (flag not given) to keep
            the factors in float (then ``moecore distill`` trains them against the frozen
            quantized core).
        group_size: weights per (scale, zero point) group, along each matrix's input side for
            the core and along each factor column.
        method: ``"hqq"`` (half-quadratic optimized scale/zero, the HQQ library) or ``"rtn"``
            (round-to-nearest min/max, same library and storage).
    """

    core_bits: int | None = field(default=4, metadata={"choices": QUANT_BITS, "unset": "core not quantized"})
    factor_bits: int | None = field(default=8, metadata={"choices": QUANT_BITS, "unset": "factors not quantized"})
    group_size: int = field(default=64, metadata={"min": 8, "max": 4096, "flag": "--quant-group"})
    method: str = field(default="hqq", metadata={"choices": QUANT_METHODS, "flag": "--quant-method"})

    KIND = "quant"

    def __post_init__(self) -> None:
        self.check_fields()
        if self.core_bits is None and self.factor_bits is None:
            raise ConfigError("quant needs core_bits or factor_bits (or use quant=None for float storage)")

    @classmethod
    def coerce(cls, value: Any) -> "QuantConfig | None":
        """``None``, a ``QuantConfig`` or its dict -> ``QuantConfig | None`` (ConfigError otherwise)."""
        if value is None or isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"quant must be a QuantConfig, a dict or None, got {type(value).__name__}")
        return cls.from_dict(value)


@dataclass
class CompressionConfig(ConfigBase):
    """How to compress every MoE layer's experts.

    Attributes:
        form: ``"ragged"`` (default: W_i ≈ C + A_i B_iᵀ with a rank per expert, water-filled
            at equal stored parameters, at most ``expert_rank_cap`` × the mean; the core applied
            once per token; the forward pads to the largest rank), ``"delta"`` (the same with
            one rank for every expert) or ``"wrapper"`` (the original wrapper form:
            W_i ≈ (I + U_out V_outᵀ) C (I + U_in V_inᵀ), the core applied once per routed expert).
        rank: the form's own rank for every projection (delta: s, ragged: the mean s over the
            experts, wrapper: r per side).
            Exactly one of ``rank`` / ``target_ratio``; if neither is given,
            ``target_ratio = 0.25``.
        target_ratio: fraction in (0, 1) of the ORIGINAL expert parameters of the whole model
            (all compressed projections together) that the compressed experts may use.
        core: the start of the shared core: ``"mean"`` of the experts; ``"frequency"``: mean
            weighted by how often the router picks each expert on the calibration text;
            ``"output"``: the core minimizing the calibration output error
            (``Σ W_i G_i (Σ G_i)⁻¹``); ``"auto"`` (default): frequency with calibration, mean
            without.  Refinement (``refine_steps``) then moves the core jointly with the factors.
        init: ``"svd"`` (plain truncated SVD of the residual), ``"whitened"`` (activation-aware,
            needs calibration) or ``"auto"`` (whitened when calibration is given).
        allocation: how ``target_ratio`` becomes ranks: ``"uniform"`` (one rank everywhere) or
            ``"greedy"`` (rank units go to the projection with the largest marginal error
            reduction per parameter).  Ignored when ``rank`` is given.
        svd: ``"exact"`` (float64), ``"gram"`` (exact top triplets from the eigendecomposition
            of the smaller Gram, float32), ``"randomized"`` (float32 range finder with
            oversampling and power iterations, warm-started across refinement steps) or
            ``"auto"`` (default): exact when the projection's short side is at most 512; above,
            gram when the SVD's width is at least a quarter of the short side (Qwen3-30B-A3B,
            DeepSeek-V3 at 25%), randomized otherwise (Mixtral-8x7B at 25%).
        refine_steps: alternating refinement iterations after the closed-form start (0 = the
            closed form only).  Delta form: core and factors alternate exact minimizations of
            the (whitened) reconstruction error; wrapper form: ALS over the output and input
            sides.  The error never increases (best iterate kept); stops early at relative
            improvement below 1e-4.
        calib_max_tokens: at most this many calibration tokens are used; longer text is
            sampled in ``calib_seq_len`` sequences spread evenly over all of it.
        calib_seq_len: calibration tokens are cut into sequences of this length.
        seed: seed of randomized SVD.
        whiten_damping: damping λ of the whitening: G + λ·mean(diag G)·I.
        calib_weighting: ``"routing"`` (default): each calibration token's contribution to an
            expert's Gram is weighted by its squared routing weight, since the expert's output is
            scaled by that weight; ``"tokens"``: every routed token counts once.
        propagate: what the next layer is calibrated on. ``"original"`` (default): the
            original layer's outputs (every layer calibrated on the original model's
            activations); ``"compressed"`` (sequential calibration): the outputs of the already
            compressed earlier layers, so every layer is fitted to what it will really receive.
            On the bundled models sequential calibration was measured worse on the from-scratch
            model and level on the upcycled one (benchmarks/RESULTS.md §3), so it is an option.
        calib_prior_tokens: experts with few routed calibration tokens are shrunk toward the
            layer-wide Gram: ``G_i + κ·Ḡ`` with ``Ḡ`` the Gram of an average routed token and κ
            this many tokens.  Experts with fewer routed tokens than κ are counted as
            under-calibrated in the statistics.  0 disables it.
        gram_dtype: storage of the per-expert Grams / whitening factors between steps (they
            are always accumulated and used in float64): ``"auto"`` keeps float64 up to 1 GiB
            per projection and float32 above (error bound in :mod:`moecore.maths.fit`).
        gram_host_gb: a Gram stack in host memory larger than this many GiB (DeepSeek-V3's
            gate/up stack: 256 x 7168² float32, 52.6 GB) is kept in a memory-mapped scratch file
            instead, its lower triangle only (28.2 GB there; :mod:`moecore.gram_store`; streamed
            compression: in the output's work folder; in memory: the system's temporary
            folder), which the kernel pages to disk.  Unset: half the
            host memory available when the stack is built.  The output is the same either way.
        fit_memory_gb: working memory in GiB for fitting one projection, on the compute device
            (``--device``: GPU memory with cuda, host RAM with cpu); experts are fitted in chunks
            that fit it.  ``expert_chunk`` fixes the chunk size instead.  Not a cap on the
            whole process: the layer's weights, Grams and activations come on top (``moecore
            plan`` estimates the peak).
        expert_chunk: experts fitted together in one chunk (fewer: less memory, more passes).
        expert_read_gb: streamed compression (``compress_checkpoint``) reads a layer's experts
            from the checkpoint whole when they take at most this many GiB, else this many GiB
            of experts at a time, each chunk read again for every pass over the experts
            (``--device`` memory; a DeepSeek-V3 layer holds 22.5 GB of bf16 experts).  The
            output is the same either way.  Applies to experts stored one tensor set per
            expert (``experts.{j}.``); experts stored fused are read whole.
        quant: ``None`` (float storage) or a :class:`QuantConfig` (or its dict): quantized core
            and/or factors, the factors refit after the core is quantized (delta form only).
        allow_larger: compress even when ``rank`` makes the experts store at least as many
            parameters as the original (refused by default, naming the break-even rank).
        recover_steps: Adam steps per layer of in-engine recovery (0 = zero-shot only): after
            each layer's zero-shot fit, its factors (and, with ``recover_train_core``, cores) are
            fitted to the ORIGINAL block's routing-weighted output on that layer's calibration
            activations, in the same per-layer pass (relative MSE; :mod:`moecore.block_recovery`).
            Every 5th calibration sequence is held out, and a layer keeps the trained weights
            only if its held-out block error fell.  Needs calibration text (ignored without);
            not applied to quantized storage (``quant``).  Default 200 (with the cores): the
            most steps within twice the zero-shot CPU time on the bundled models, measured
            in benchmarks/RESULTS.md §3f.
        recover_lr: peak relative learning rate of in-engine recovery: each trained tensor's Adam
            step size is this fraction of its RMS (factors differ in scale by orders of
            magnitude), cosine-decayed to 0.
        recover_batch_tokens: calibration tokens per in-engine recovery step.
        recover_memory_gb: memory in GiB (on the compute device) that in-engine recovery's
            trained tensors may take, at 24 bytes per element (float32 value, gradient, Adam's
            two moments, each step's operands).  A layer whose factors need more (DeepSeek-V3's
            256 experts at 25%: 123 GiB) is trained a chunk of experts at a time, its factors
            only (the cores, shared by every chunk, stay as fitted); each chunk is fitted to the
            original block's output minus the other experts' and kept only if the layer's
            held-out error fell.  Layers within it (every layer of Qwen3-30B-A3B and
            Mixtral-8x7B at the defaults) train all at once.
        recover_train_core: in-engine recovery also trains the shared cores (default), not
            only the factors: lower held-out perplexity at every step count measured (§3f).
        expert_rank_cap: ``form="ragged"`` (per-expert ranks, water-filled at equal stored
            parameters): the largest rank one expert may get, as a multiple of the projection's
            mean rank; the forward pads every expert to the largest rank, so this also bounds
            the padded operands' memory and multiply-adds (benchmarks/RESULTS.md §3g).
    """

    form: str = field(default=DEFAULT_FORM, metadata={"choices": FORM_NAMES, "also": registered_form})
    rank: int | None = field(default=None, metadata={"gt": 0, "unset": "none: --target-ratio decides"})
    target_ratio: float | None = field(default=None, metadata={"unset": "0.25 unless --rank is given"})
    core: str = field(default="auto", metadata={"choices": ("auto", "mean", "frequency", "output")})
    init: str = field(default="auto", metadata={"choices": ("auto", "svd", "whitened")})
    allocation: str = field(default="uniform", metadata={"choices": ("uniform", "greedy")})
    svd: str = field(default="auto", metadata={"choices": ("auto", "exact", "gram", "randomized")})
    refine_steps: int = field(default=10, metadata={"min": 0})
    calib_max_tokens: int = field(default=32768, metadata={"gt": 0, "aliases": ("--calib-tokens",)})
    calib_seq_len: int = field(default=512, metadata={"gt": 0})
    seed: int = field(default=0, metadata={"min": 0})
    whiten_damping: float = field(default=0.01, metadata={"min": 0})
    calib_weighting: str = field(default="routing", metadata={"choices": ("tokens", "routing")})
    propagate: str = field(default="original", metadata={"choices": ("compressed", "original")})
    calib_prior_tokens: float = field(default=64.0, metadata={"min": 0})
    gram_dtype: str = field(default="auto", metadata={"choices": ("auto", "float64", "float32")})
    gram_host_gb: float | None = field(default=None, metadata={"gt": 0, "unset": "half the available host memory",
                                                               "same_output": True})
    fit_memory_gb: float = field(default=6.0, metadata={"gt": 0})
    expert_chunk: int | None = field(default=None, metadata={"gt": 0, "unset": "as many as --fit-memory-gb allows"})
    expert_read_gb: float = field(default=4.0, metadata={"gt": 0, "same_output": True})
    quant: QuantConfig | None = None
    allow_larger: bool = False
    recover_steps: int = field(default=200, metadata={"min": 0})
    recover_lr: float = field(default=0.02, metadata={"gt": 0, "max": 1.0})
    recover_batch_tokens: int = field(default=1024, metadata={"gt": 0})
    recover_train_core: bool = True
    recover_memory_gb: float = field(default=16.0, metadata={"gt": 0})
    expert_rank_cap: float = field(default=2.0, metadata={"min": 1.0})

    FILENAME = CONFIG_FILENAME
    KIND = "compression config"

    def __post_init__(self) -> None:
        self.quant = QuantConfig.coerce(self.quant)
        self.check_fields()
        if self.rank is not None and self.target_ratio is not None:
            raise ConfigError("give either rank or target_ratio, not both")
        if self.rank is None and self.target_ratio is None:
            self.target_ratio = 0.25
        if self.target_ratio is not None and not 0.0 < self.target_ratio < 1.0:
            raise ConfigError(
                f"target_ratio must be in (0, 1) (a fraction of the original expert parameters), "
                f"got {self.target_ratio}"
            )
        if self.quant is not None and not get_form(self.form).quantizable:  # loads the forms (torch)
            raise ConfigError(f"quant is supported for form {' or '.join(map(repr, quantizable_forms()))} only, "
                              f"got form {self.form!r}")


# ------------------------------------------------------------------ training (moecore.training)
DISTILL_CONFIG = "distill_config.json"
RECOVERY_CONFIG = "recovery_config.json"
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial",
              "inverse_sqrt")


EVAL_CONFIG = "eval_config.json"
#: dtypes a verb loads a model in (``auto``: the checkpoint's)
LOAD_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class EvalConfig(ConfigBase):
    """What moecore eval measures, and where it runs.

    Held-out perplexity with the pinned protocol, or lm-evaluation-harness tasks with ``tasks``.

    Attributes:
        split: the bundled-corpus split to score (unless a text file is given).
        seq_len: tokens per perplexity window.
        stride: tokens a window advances (every token is scored once, with at least
            ``seq_len - stride`` tokens of context).
        max_tokens: truncate the token stream (quick checks; recorded results use it all).
        tasks: lm-eval tasks instead of perplexity, e.g. moecore_heldout_ppl,moecore_heldout_mc
            (offline) or any standard lm-eval task name.
        limit: lm-eval: documents per task (or a fraction below 1).
        batch_size: lm-eval batch size.
        max_length: lm-eval: the model's context window.
        num_fewshot: lm-eval: few-shot examples.
        dtype: dtype to load the model in (the recorded protocol is float32).
        device: where to run it: auto (cuda if available), cpu, cuda, cuda:1, ...
    """

    split: str = field(default="heldout", metadata={"choices": ("heldout", "calib")})
    seq_len: int | None = field(default=None, metadata={"gt": 0, "unset": "256, the pinned protocol"})
    stride: int | None = field(default=None, metadata={"gt": 0, "unset": "128, or seq_len if shorter"})
    max_tokens: int | None = field(default=None, metadata={"gt": 0, "unset": "all"})
    tasks: list[str] | None = field(default=None, metadata={"unset": "none: perplexity"})
    limit: float | None = field(default=None, metadata={"gt": 0, "unset": "every document"})
    batch_size: int = field(default=8, metadata={"gt": 0})
    max_length: int | None = field(default=None, metadata={"gt": 0, "unset": "the model's"})
    num_fewshot: int | None = field(default=None, metadata={"min": 0, "unset": "the task's"})
    dtype: str = field(default="float32", metadata={"choices": LOAD_DTYPES})
    device: str = "auto"

    FILENAME = EVAL_CONFIG
    KIND = "eval config"

    def __post_init__(self) -> None:
        self.check_fields()
        if self.tasks is not None and not self.tasks:
            raise ConfigError("tasks is empty: name at least one lm-eval task, or leave it unset")


@dataclass
class RecoveryConfig(ConfigBase):
    """How layer-wise local recovery fits each compressed experts block to the original block.

    Attributes:
        steps: Adam steps per layer (0: only measure the errors).
        lr: peak relative learning rate: each trained tensor's Adam step size is this fraction
            of its RMS, cosine-decayed to 0 (:func:`moecore.block_recovery.step_sizes`).
        batch_tokens: calibration tokens per Adam step.
        max_tokens: calibration tokens in all (every 5th sequence is held back to judge each
            layer, which is only kept if it improved on those).
        seq_len: calibration sequence length.
        forward_batch: sequences per forward pass while capturing a layer's inputs.
        train_core: also fit the shared cores (default: only the factors).
        memory_gb: memory in GiB that the trained tensors may take (24 bytes per element); a
            layer whose factors need more is trained a chunk of experts at a time, factors only
            (as ``CompressionConfig.recover_memory_gb``).
        seed: seed of the token sampling.
    """

    steps: int = field(default=200, metadata={"min": 0})
    lr: float = field(default=0.02, metadata={"gt": 0, "max": 1.0})
    batch_tokens: int = field(default=1024, metadata={"gt": 0})
    max_tokens: int = field(default=32768, metadata={"gt": 0})
    seq_len: int = field(default=256, metadata={"gt": 0})
    forward_batch: int = field(default=8, metadata={"gt": 0})
    train_core: bool = False
    memory_gb: float = field(default=16.0, metadata={"gt": 0})
    seed: int = field(default=0, metadata={"min": 0})

    FILENAME = RECOVERY_CONFIG
    KIND = "recovery config"

    def __post_init__(self) -> None:
        self.check_fields()


@dataclass
class DistillConfig(ConfigBase):
    """How logit distillation trains a compressed student (loss T²·KL(teacher‖student) + α·CE).

    Attributes:
        max_steps: optimizer steps in all (a resumed run continues up to this step).
        lr: peak learning rate (AdamW, no weight decay).
        temperature: KD temperature T (the loss uses T² · KL).
        alpha: weight of the cross-entropy term on the text itself.
        experts_loss_weight: weight of a loss on the MoE blocks' outputs as well as the logits: each
            experts module's output against the teacher's, relative squared error averaged over
            the layers (0: logits only).
        block_size: tokens per packed training block.
        batch_size: blocks per step and process.
        grad_accum: gradient accumulation steps.
        warmup_steps: learning-rate warm-up steps.
        scheduler: learning-rate schedule after the warm-up (transformers' names).
        save_steps: write a checkpoint every this many steps (and at the end).
        save_total_limit: keep only the last this many checkpoints (default: all).
        logging_steps: log the losses every this many steps.
        train_core: train the shared cores as well as the factors (default; ``False``: the
            factors only). Measured at 800 steps from the default compression (RESULTS §4b):
            better on both bundled models (tiny-qwen3moe +2.43% against +2.48%, tiny-mixtral
            −0.50% against −0.21%), 2-12% more CPU time.  Only with ``train_factors``:
            router-only KD keeps the cores frozen.
        train_router: also train the routers.
        train_factors: train the factors (default); off with ``train_router`` on: router-only KD
            (arXiv 2603.02217), every expert weight frozen.
        recover_steps: first run layer-wise local recovery with this many Adam steps per layer
            (0: none; skipped when resuming from a checkpoint).
        eval_async: evaluate each checkpoint in a background process while training runs.
        eval_max_tokens: held-out tokens per background evaluation (``None``: all).
        eval_tasks: also run these lm-eval tasks on each checkpoint (comma-separated).
        eval_limit: documents per lm-eval task.
        eval_blocks: training blocks the final KD loss is measured on.
        seed: seed of the data order and of the Trainer.
    """

    max_steps: int = field(default=200, metadata={"gt": 0})
    lr: float = field(default=1e-3, metadata={"gt": 0})
    temperature: float = field(default=1.0, metadata={"gt": 0})
    alpha: float = field(default=0.1, metadata={"min": 0})
    experts_loss_weight: float = field(default=0.0, metadata={"min": 0})
    block_size: int = field(default=128, metadata={"min": 2})
    batch_size: int = field(default=8, metadata={"gt": 0})
    grad_accum: int = field(default=1, metadata={"gt": 0})
    warmup_steps: int = field(default=0, metadata={"min": 0})
    scheduler: str = field(default="cosine", metadata={"choices": SCHEDULERS})
    save_steps: int = field(default=50, metadata={"gt": 0})
    save_total_limit: int | None = field(default=None, metadata={"gt": 0, "unset": "keep all"})
    logging_steps: int = field(default=10, metadata={"gt": 0})
    train_core: bool = True
    train_router: bool = False
    train_factors: bool = True
    recover_steps: int = field(default=0, metadata={"min": 0})
    eval_async: bool = False
    eval_max_tokens: int | None = field(default=16384, metadata={"gt": 0})
    eval_tasks: list[str] | None = field(default=None, metadata={"unset": "none: held-out perplexity only"})
    eval_limit: int | None = field(default=None, metadata={"gt": 0, "unset": "every document"})
    eval_blocks: int = field(default=2, metadata={"gt": 0})
    seed: int = field(default=0, metadata={"min": 0})

    FILENAME = DISTILL_CONFIG
    KIND = "distill config"

    def __post_init__(self) -> None:
        self.check_fields()
        if self.eval_tasks is not None and not self.eval_tasks:
            raise ConfigError("eval_tasks is empty: name at least one lm-eval task, or leave it unset")
