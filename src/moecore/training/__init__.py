"""Recovery of compressed models: logit distillation (:func:`distill`, :class:`DistillTrainer`),
layer-wise local recovery (:func:`recover`), compressed checkpoints with resume, and the
asynchronous checkpoint evaluator (:class:`EvalWorker`)."""
from .async_eval import EvalWorker
from .distill import DistillResult, distill
from .kd import DistillTrainer, kd_loss
from .recover import RecoveryReport, recover

__all__ = ["DistillTrainer", "DistillResult", "EvalWorker", "RecoveryReport", "distill", "kd_loss", "recover"]
