"""``DistillConfig`` and ``RecoveryConfig``, the configurations of :func:`moecore.training.distill`
and :func:`moecore.training.recover`, as this package's names for them.  They are defined in
:mod:`moecore.config` beside ``CompressionConfig``, so that the command line reads every
verb's flags without importing the training stack."""
from __future__ import annotations

from ..config import DISTILL_CONFIG, RECOVERY_CONFIG, SCHEDULERS, DistillConfig, RecoveryConfig

__all__ = ["DISTILL_CONFIG", "RECOVERY_CONFIG", "SCHEDULERS", "DistillConfig", "RecoveryConfig"]
