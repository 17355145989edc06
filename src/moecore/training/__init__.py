"""Recovery of compressed models: logit distillation (:func:`distill` with a
:class:`DistillConfig`, :class:`DistillTrainer`), layer-wise local recovery (:func:`recover` with
a :class:`RecoveryConfig`), compressed checkpoints with resume, and the asynchronous checkpoint
evaluator (:class:`EvalWorker`)."""
from .async_eval import EvalWorker
from .config import DistillConfig, RecoveryConfig
from .distill import DistillResult, distill
from .kd import DistillTrainer, kd_loss
from .recover import RecoveryReport, recover

__all__ = ["DistillConfig", "DistillTrainer", "DistillResult", "EvalWorker", "RecoveryConfig", "RecoveryReport",
           "distill", "kd_loss", "recover"]
