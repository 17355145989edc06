"""The contract every form of the compressed experts fulfils (:class:`Form`).

A *form* is one way of writing the experts ``W_i (d_out, d_in)`` of one projection (gate,
up or down) from the shared core ``C (d_out, d_in)`` and per-expert low-rank factors.  It
owns everything that depends on that choice:

- the stored names (core ``core_{p}``, factors ``{factor_name}_{p}``, each ``(E, d, rank)``) and
  shapes, which everything else asks the form for (:meth:`Form.stored_names`);
- the counts: parameters per rank unit and the multiply-adds per token (:meth:`Form.active_macs_per_token`,
  the one place that formula is written);
- the fit (delegating to the pure maths in :mod:`moecore.maths`), the dense reconstruction,
  and the grouped-GEMM operands and forward (built on the primitives of :mod:`moecore.grouped`);
- how its factors are stored quantized (:meth:`Form.quantize_factors`, :meth:`Form.refit_factors`;
  the codes themselves are :mod:`moecore.quant`'s).

Forms are stateless singletons, looked up by name in :mod:`moecore.forms`; one outside this
package is added with :func:`moecore.forms.register_form`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from ..grouped import Activation, Routing

Tensor = torch.Tensor

#: the projections of one experts module, in their stored order (every form compresses all three)
PROJECTIONS = ("gate", "up", "down")


def cast_floating(t: Tensor, dtype: torch.dtype | None) -> Tensor:
    """``t`` in ``dtype`` if it is floating and ``dtype`` is given (index tensors stay integers)."""
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


@dataclass
class FitResult:
    """What :meth:`Form.fit` returns: ``core (d_out, d_in)`` and ``factors`` (in
    :attr:`Form.factor_names` order, each ``(E, d, rank)``), float64 on the fitting device;
    ``history`` the objective (start first); ``refine_iters`` the refinement steps run;
    ``whitened``: ``(Σ_i ‖(W_i − Ŵ_i) L_i‖², Σ_i ‖W_i L_i‖²)`` of the returned fit where the
    fit knows both without extra work (the fit report's errors then skip two whitened
    products per expert), else ``None``."""

    core: Tensor
    factors: tuple[Tensor, ...]
    history: list[float]
    refine_iters: int
    whitened: tuple[float, float] | None = None


class Form(ABC):
    """One form of the compressed experts (see the module docstring).

    Class attributes:
        name: the form's name in configs and checkpoints (``CompressionConfig.form``).
        factor_names: stored factor name stems, in storage order; projection ``p``'s factors
            are stored as ``{stem}_{p}`` (see :meth:`param_names`).
        quantizable: whether :mod:`moecore.quant` can store this form (its core and factors
            quantized; True unless a form opts out).
        svd_units_per_rank: residual singular values one rank unit of this form is counted
            as removing in the greedy allocation (:meth:`rank_unit_gains`).
        index_names: name stems of integer tensors stored beside each projection's factors
            (``{stem}_{p}``, each ``(E,)`` int32, e.g. per-expert ranks): stored bytes, not
            parameters; none by default.
        counts_note: what the statistics' ``notes`` say about this form's counts ("" = nothing).
        chunked_weights: :meth:`fit` reads ``weights`` only as ``weights[a:b]`` (and its
            ``shape`` / ``dtype`` / ``device``), so it may be given an
            :class:`~moecore.expert_source.ExpertView` that reads a chunk of experts at a time
            (a layer larger than memory); False (the default for a new form): it gets the
            whole stack as one tensor.
    """

    name: str = ""
    factor_names: tuple[str, ...] = ()
    index_names: tuple[str, ...] = ()
    counts_note: str = ""
    quantizable: bool = True
    svd_units_per_rank: int = 1
    chunked_weights: bool = False

    def __repr__(self) -> str:
        return f"<moecore form {self.name!r}>"

    # ------------------------------------------------------------------ names and shapes
    @staticmethod
    def core_name(p: str) -> str:
        """Stored name of projection ``p``'s shared core, ``core_{p}`` (every form has one)."""
        return f"core_{p}"

    def param_names(self, p: str) -> tuple[str, ...]:
        """Stored factor parameter names of projection ``p``, e.g. ``("delta_a_gate", "delta_b_gate")``."""
        return tuple(f"{stem}_{p}" for stem in self.factor_names)

    def index_param_names(self, p: str) -> tuple[str, ...]:
        """Stored integer tensor names of projection ``p`` (:attr:`index_names`), e.g. ``("ragged_r_gate",)``."""
        return tuple(f"{stem}_{p}" for stem in self.index_names)

    def factor_tensor_names(self, p: str) -> tuple[str, ...]:
        """What :meth:`reconstruct` and :meth:`to_stored` take: the factors, then the index tensors."""
        return (*self.param_names(p), *self.index_param_names(p))

    def stored_names(self, p: str) -> tuple[str, ...]:
        """Every stored tensor name of projection ``p``: the core, the factors, the index tensors."""
        return (self.core_name(p), *self.factor_tensor_names(p))

    def to_stored(self, num_experts: int, factors: tuple[Tensor, ...],
                  dtype: torch.dtype | None = None) -> tuple[int, tuple[Tensor, ...]]:
        """``(rank, stored tensors in factor_tensor_names order)`` from :meth:`fit`'s factors,
        the floating ones cast to ``dtype`` if given (default: stored as fitted, the rank their
        last dimension)."""
        return int(factors[0].shape[-1]), tuple(cast_floating(f, dtype) for f in factors)

    def check_index(self, get: Callable[[str], Tensor], p: str, num_experts: int, rank: int) -> str | None:
        """Load-time check of projection ``p``'s index tensors: what is wrong, or ``None``."""
        return None

    @abstractmethod
    def factor_shapes(self, num_experts: int, d_out: int, d_in: int, rank: int) -> tuple[tuple[int, ...], ...]:
        """Shapes of one projection's factors, in :attr:`factor_names` order."""

    # ------------------------------------------------------------------ counts
    @abstractmethod
    def rank_unit_params(self, d_out: int, d_in: int) -> int:
        """Factor parameters one unit of rank adds to ONE expert of a ``(d_out, d_in)`` projection."""

    def projection_params(self, num_experts: int, d_out: int, d_in: int, rank: int) -> int:
        """Stored parameters of one projection: the core ``d_out·d_in`` plus every expert's factors."""
        return d_out * d_in + rank * num_experts * self.rank_unit_params(d_out, d_in)

    @abstractmethod
    def core_runs_per_token(self, top_k: int) -> int:
        """How many times the forward multiplies one token by the core (once, or once per routed pair)."""

    def active_macs_per_token(self, d_out: int, d_in: int, factor_params: int, top_k: int) -> int:
        """Matrix multiply-adds per token of one ``(d_out, d_in)`` projection (elementwise ops
        not counted): the core runs plus ``top_k`` low-rank paths, each one multiply-add per
        factor weight of its expert (``factor_params`` = one expert's factor weights of this
        projection, ``rank · rank_unit_params``)."""
        return self.core_runs_per_token(top_k) * d_out * d_in + top_k * factor_params

    def rank_unit_gains(self, svd_gains: Tensor) -> Tensor:
        """Greedy allocation: ``(k,)`` energies removed by successive delta-style rank units
        (squared residual singular values) -> ``(ceil(k / n),)`` energies per rank unit of this
        form, ``n = svd_units_per_rank`` consecutive values summed."""
        n = self.svd_units_per_rank
        if n == 1:
            return svd_gains
        return F.pad(svd_gains, (0, (-svd_gains.numel()) % n)).view(-1, n).sum(-1)

    # ------------------------------------------------------------------ maths
    def svd_width(self, rank: int, expert_rank_cap: float = 2.0) -> int:
        """Columns of the widest truncated SVD :meth:`fit` takes per expert at ``rank`` (what the
        SVD method's cost depends on): ``rank`` unless a form says otherwise."""
        return rank

    @abstractmethod
    def fit(self, weights: Tensor, core: Tensor, rank: int, L: Tensor | None, K: Tensor | None, *, steps: int,
            method: str, generator: torch.Generator | None, chunk: int, device: torch.device,
            f64_factor_limit: int, expert_rank_cap: float = 2.0) -> FitResult:
        """Fit core and factors of one projection, ``chunk`` experts at a time (the maths in
        :mod:`moecore.maths.fit`).  ``expert_rank_cap``: for forms with per-expert ranks, the
        largest rank of one expert as a multiple of ``rank`` (others ignore it).

        ``weights (E, d_out, d_in)`` (any dtype/device), ``core (d_out, d_in)`` the start,
        ``L (E, d_in, d_in)`` whitening factors or ``None``, ``K (d_in, d_in)`` the lower Cholesky factor of ``S = Σ Ĝ_i``,
        ``steps`` refinement steps, ``method`` the SVD method, ``f64_factor_limit``: factor
        stacks larger than this many float64 bytes may be kept in float32 between steps."""

    @abstractmethod
    def reconstruct(self, core: Tensor, factors: tuple[Tensor, ...]) -> Tensor:
        """Dense experts ``(E, d_out, d_in)`` from ``core (d_out, d_in)`` and ``factors``."""

    @abstractmethod
    def fused_operands(self, get: Callable[[str], Tensor], ranks: Mapping[str, int]) -> dict[str, Tensor]:
        """Grouped-GEMM operands of the forward from the stored tensors ``get(name)``
        (differentiable; see :mod:`moecore.grouped`)."""

    # ------------------------------------------------------------------ training
    #: the form a copy of this form's module is trained in (:meth:`to_training`); its own name
    #: by default (trained as stored)
    training_form: str = ""
    #: every factor of this form is a stack with one entry per expert (leading axis ``E``), so
    #: recovery can train the factors of a chunk of experts as a module of their own
    #: (:func:`moecore.block_recovery.train_experts_in_chunks`)
    per_expert_factors: bool = False

    def to_training(self, get: Callable[[str], Tensor], p: str) -> tuple[Tensor, ...]:
        """Projection ``p``'s factors in :attr:`training_form`'s storage order, from the stored
        tensors ``get(name)`` (default: the stored factors themselves)."""
        return tuple(get(n) for n in self.param_names(p))

    def from_training(self, get: Callable[[str], Tensor], p: str, factors: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """The inverse of :meth:`to_training`: stored factors of projection ``p`` (in
        :attr:`factor_names` order) from trained ``factors`` (default: as they are)."""
        return factors

    def training_slice(self, get: Callable[[str], Tensor], p: str, a: int, b: int) -> tuple[Tensor, ...]:
        """Experts ``a:b`` of :meth:`to_training`'s factors, for a training form with
        :attr:`per_expert_factors` (default: rows ``a:b`` of the stored factors, views)."""
        return tuple(get(n)[a:b] for n in self.param_names(p))

    def set_training_slice(self, get: Callable[[str], Tensor], p: str, a: int, b: int,
                           factors: tuple[Tensor, ...]) -> None:
        """Write trained experts ``a:b`` (:meth:`training_slice`'s layout) into the stored factors."""
        for n, t in zip(self.param_names(p), factors):
            get(n)[a:b].copy_(t)

    # ------------------------------------------------------------------ quantized storage
    def refit_factors(self, weights: Tensor, core: Tensor, rank: int, L: Tensor | None, K: Tensor | None, *,
                      chunk: int | None = None, device=None, method: str = "exact") -> tuple[Tensor, ...] | None:
        """Factors refit to ``weights (E, d_out, d_in)`` for a fixed (quantized) ``core``, so that
        they absorb its rounding error, ``chunk`` experts at a time on ``device``; ``L (E, d_in, d_in)``
        and ``K`` the fit's whitening factors (:func:`moecore.maths.fit.whiten_in_place`) or
        ``None`` (weight space); ``method`` the fit's SVD path.  ``None`` (this default): the form
        keeps the factors of its float fit."""
        return None

    def quantize_factors(self, factors: tuple[Tensor, ...], quantize: Callable[[int, Tensor], Tensor], *,
                         residual: Callable[[slice], Tensor] | None = None, resolve: bool = True,
                         chunk: int | None = None) -> tuple[Tensor, ...]:
        """Quantize one projection's ``factors`` (float64, storage order), each through
        ``quantize(i, t)``, which stores factor ``i``'s codes and returns its dequantized values;
        returns the dequantized factors.  A form may re-solve later factors for the quantized
        earlier ones (``resolve``), against ``residual(experts) = W − core`` ``(n, d_out, d_in)``
        (float64, ``chunk`` experts at a time) when given, else against its current product.
        Default: each factor quantized as it is."""
        return tuple(quantize(i, t) for i, t in enumerate(factors))

    @abstractmethod
    def forward(self, x: Tensor, route: Routing, ops: dict[str, Tensor], act: Activation,
                bias_gu: tuple[Tensor, Tensor] | None = None, bias_down: Tensor | None = None) -> Tensor:
        """Experts forward ``x (T, H) -> (T, H)`` on :meth:`fused_operands`; ``bias_gu`` =
        gate/up biases ``(E, F)`` each, ``bias_down (E, H)``."""
