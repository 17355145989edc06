"""Pure maths of moecore: decompositions (:mod:`.decompose`), expert-chunked fitting (:mod:`.fit`)
and parameter budgets (:mod:`.budget`).
No modules, hooks or I/O here."""
from . import budget, decompose, fit
from .budget import ProjectionShape, projection_params, solve_greedy, solve_uniform
from .fit import expert_core, output_core
from .decompose import (
    delta_factors,
    reconstruct_delta,
    reconstruct_wrapper,
    relative_output_error,
    relative_weight_error,
    residual_spectrum,
    truncated_svd,
    whitened_delta_factors,
    whitening_factor,
    wrapper_factors,
)

__all__ = [
    "budget", "decompose", "fit", "ProjectionShape", "projection_params", "solve_greedy", "solve_uniform",
    "delta_factors", "expert_core", "output_core", "reconstruct_delta", "reconstruct_wrapper", "relative_output_error",
    "relative_weight_error", "residual_spectrum", "truncated_svd", "whitened_delta_factors",
    "whitening_factor", "wrapper_factors",
]
