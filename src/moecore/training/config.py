"""``DistillConfig`` and ``RecoveryConfig``: the typed, validated configurations of
:func:`moecore.training.distill` and :func:`moecore.training.recover`.

Like :class:`~moecore.config.CompressionConfig` they are validated on creation
(:class:`~moecore.errors.ConfigError`), carry a format version, are saved as JSON beside
their output (``distill_config.json`` in the run folder, ``recovery_config.json`` in the
recovered checkpoint) and define the flags of ``moecore distill`` / ``moecore recover``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..config_base import ConfigBase
from ..errors import ConfigError

DISTILL_CONFIG = "distill_config.json"
RECOVERY_CONFIG = "recovery_config.json"
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial",
              "inverse_sqrt")


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
        seed: seed of the token sampling.
    """

    steps: int = field(default=200, metadata={"min": 0})
    lr: float = field(default=0.02, metadata={"gt": 0, "max": 1.0})
    batch_tokens: int = field(default=1024, metadata={"gt": 0})
    max_tokens: int = field(default=32768, metadata={"gt": 0})
    seq_len: int = field(default=256, metadata={"gt": 0})
    forward_batch: int = field(default=8, metadata={"gt": 0})
    train_core: bool = False
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
        block_size: tokens per packed training block.
        batch_size: blocks per step and process.
        grad_accum: gradient accumulation steps.
        warmup_steps: learning-rate warm-up steps.
        scheduler: learning-rate schedule after the warm-up (transformers' names).
        save_steps: write a checkpoint every this many steps (and at the end).
        save_total_limit: keep only the last this many checkpoints (default: all).
        logging_steps: log the losses every this many steps.
        train_core: also train the shared cores (default: only the factors).
        train_router: also train the routers.
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
    block_size: int = field(default=128, metadata={"min": 2})
    batch_size: int = field(default=8, metadata={"gt": 0})
    grad_accum: int = field(default=1, metadata={"gt": 0})
    warmup_steps: int = field(default=0, metadata={"min": 0})
    scheduler: str = field(default="cosine", metadata={"choices": SCHEDULERS})
    save_steps: int = field(default=50, metadata={"gt": 0})
    save_total_limit: int | None = field(default=None, metadata={"gt": 0})
    logging_steps: int = field(default=10, metadata={"gt": 0})
    train_core: bool = False
    train_router: bool = False
    recover_steps: int = field(default=0, metadata={"min": 0})
    eval_async: bool = False
    eval_max_tokens: int | None = field(default=16384, metadata={"gt": 0})
    eval_tasks: list[str] | None = None
    eval_limit: int | None = field(default=None, metadata={"gt": 0})
    eval_blocks: int = field(default=2, metadata={"gt": 0})
    seed: int = field(default=0, metadata={"min": 0})

    FILENAME = DISTILL_CONFIG
    KIND = "distill config"

    def __post_init__(self) -> None:
        self.check_fields()
        if self.eval_tasks is not None and not self.eval_tasks:
            raise ConfigError("eval_tasks is empty: name at least one lm-eval task, or leave it unset")
