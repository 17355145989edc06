"""Parameter budgets: counts per form, and ``target_ratio`` -> ranks (pure: shapes in,
ranks out; used by ``compress`` and by the config-only ``plan``).

A *projection* is one of gate/up/down of one MoE layer, described by
:class:`ProjectionShape`.  Ranks are the form's own rank: ``s`` for delta, ``r`` (per side)
for wrapper; the wrapper's rank unit costs twice the delta's.

The per-form counts are the forms' own (:class:`FormCounts`, implemented by
:class:`moecore.forms.Form`); every function here takes ``form`` as such an object or as
the name of a registered form (:mod:`moecore.forms` registers its forms through
:func:`register_form`; this module imports nothing outside ``moecore.errors``).
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Hashable, Mapping, Protocol, Sequence

from ..errors import ConfigError


class FormCounts(Protocol):
    """What the budget needs of a form (see :class:`moecore.forms.Form`)."""

    name: str

    def rank_unit_params(self, d_out: int, d_in: int) -> int:
        """Factor parameters one rank unit adds to one expert of a ``(d_out, d_in)`` projection."""

    def projection_params(self, num_experts: int, d_out: int, d_in: int, rank: int) -> int:
        """Stored parameters of one projection (core + every expert's factors)."""

    def active_macs_per_token(self, d_out: int, d_in: int, factor_params: int, top_k: int) -> int:
        """Multiply-adds per token of one projection (``factor_params``: one expert's factor weights)."""


FormLike = str | FormCounts
_NAMED: dict[str, FormCounts] = {}  # filled by moecore.forms


def register_form(form: FormCounts) -> None:
    """Make ``form`` usable by name here (called by :mod:`moecore.forms` for each of its forms)."""
    _NAMED[form.name] = form


def unregister_form(name: str) -> None:
    """Forget the form called ``name`` (:func:`moecore.forms.unregister_form`)."""
    _NAMED.pop(name, None)


def form_counts(form: FormLike) -> FormCounts:
    """``form`` itself, or the registered form of that name (``ConfigError`` for an unknown name)."""
    if not isinstance(form, str):
        return form
    try:
        return _NAMED[form]
    except KeyError:
        raise ConfigError(f"form must be one of {', '.join(map(repr, _NAMED))}, got {form!r}") from None


@dataclass(frozen=True)
class ProjectionShape:
    """One compressed projection: ``key`` (e.g. ``("model.layers.0.mlp.experts", "gate")``),
    ``num_experts``, ``d_out``, ``d_in``."""

    key: Hashable
    num_experts: int
    d_out: int
    d_in: int

    @property
    def max_rank(self) -> int:
        """Largest allowed rank, ``min(d_in, d_out)`` (both forms are exact there)."""
        return min(self.d_out, self.d_in)

    @property
    def original_params(self) -> int:
        """Parameters of the original experts of this projection: ``E·d_out·d_in``."""
        return self.num_experts * self.d_out * self.d_in


def rank_unit_params(form: FormLike, p: ProjectionShape) -> int:
    """Parameters added by one unit of rank to the whole projection (all ``E`` experts):
    delta ``E(d_out+d_in)``, wrapper ``2E(d_out+d_in)``."""
    return p.num_experts * form_counts(form).rank_unit_params(p.d_out, p.d_in)


def projection_params(form: FormLike, p: ProjectionShape, rank: int) -> int:
    """Compressed parameters of one projection: delta ``d_out·d_in + E·s·(d_out+d_in)``,
    wrapper ``d_out·d_in + E·2r·(d_out+d_in)``."""
    return form_counts(form).projection_params(p.num_experts, p.d_out, p.d_in, rank)


def total_params(form: FormLike, shapes: Sequence[ProjectionShape], ranks: Mapping[Hashable, int]) -> int:
    """Sum of :func:`projection_params` over ``shapes`` with ``ranks[key]``."""
    return sum(projection_params(form, p, ranks[p.key]) for p in shapes)


def original_params(shapes: Sequence[ProjectionShape]) -> int:
    """Sum of the original expert parameters of ``shapes``."""
    return sum(p.original_params for p in shapes)


def check_rank(p: ProjectionShape, rank: int) -> None:
    """Raise ``ConfigError`` naming the projection if ``rank`` is not in ``[1, min(d_in, d_out)]``."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise ConfigError(f"rank must be a positive integer, got {rank!r} for {p.key}")
    if rank > p.max_rank:
        raise ConfigError(
            f"rank {rank} is larger than min(d_in, d_out) = {p.max_rank} of projection {p.key} "
            f"(d_out={p.d_out}, d_in={p.d_in}); at rank {p.max_rank} it is already exact"
        )


def check_smaller(form: FormLike, shapes: Sequence[ProjectionShape], rank: int) -> None:
    """Raise ``ConfigError`` if one ``rank`` everywhere stores at least as many expert
    parameters as the original, naming the break-even rank (the largest that is smaller)."""
    orig = original_params(shapes)
    total = total_params(form, shapes, {p.key: min(rank, p.max_rank) for p in shapes})
    if total < orig:
        return
    lo, hi = 0, rank  # largest uniform rank whose total is below the original (0: none is)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if total_params(form, shapes, {p.key: min(mid, p.max_rank) for p in shapes}) < orig:
            lo = mid
        else:
            hi = mid - 1
    below = (f"ranks up to {lo} are smaller (break-even rank {lo + 1})" if lo else
             "no rank of this form is smaller")
    raise ConfigError(
        f"rank {rank} stores {total / orig:.1%} of the original expert parameters ({total:,} against "
        f"{orig:,}): not smaller than the original; {below}; pass allow_larger=True (--allow-larger) "
        "to compress anyway")


def _target(shapes: Sequence[ProjectionShape], target_ratio: float) -> int:
    if not 0.0 < target_ratio < 1.0:
        raise ConfigError(f"target_ratio must be in (0, 1), got {target_ratio}")
    if not shapes:
        raise ConfigError("no projections to compress")
    return int(target_ratio * original_params(shapes))


def _unreachable(form: FormLike, shapes: Sequence[ProjectionShape], target_ratio: float) -> ConfigError:
    orig = original_params(shapes)
    core_only = sum(p.d_out * p.d_in for p in shapes)
    rank1 = total_params(form, shapes, {p.key: 1 for p in shapes})
    worst = max(shapes, key=lambda p: projection_params(form, p, 1) / p.original_params)
    return ConfigError(
        f"target_ratio {target_ratio} is unreachable for form {form_counts(form).name!r}: the cores alone take "
        f"{core_only / orig:.4f} and rank 1 everywhere takes {rank1 / orig:.4f} of the original "
        f"expert parameters (tightest projection: {worst.key}); use a target_ratio >= {rank1 / orig:.4f}"
    )


def solve_uniform(form: FormLike, shapes: Sequence[ProjectionShape], target_ratio: float) -> dict[Hashable, int]:
    """Largest single rank ``r`` (capped per projection at ``min(d_in, d_out)``) whose total
    compressed parameters stay ``<= target_ratio ·`` original.  ``ConfigError`` if rank 1
    already exceeds the target."""
    target = _target(shapes, target_ratio)

    def ranks_for(r: int) -> dict[Hashable, int]:
        return {p.key: min(r, p.max_rank) for p in shapes}

    if total_params(form, shapes, ranks_for(1)) > target:
        raise _unreachable(form, shapes, target_ratio)
    lo, hi = 1, max(p.max_rank for p in shapes)
    while lo < hi:  # total is non-decreasing in r: binary search the largest feasible r
        mid = (lo + hi + 1) // 2
        if total_params(form, shapes, ranks_for(mid)) <= target:
            lo = mid
        else:
            hi = mid - 1
    return ranks_for(lo)


def solve_greedy(
    form: FormLike, shapes: Sequence[ProjectionShape], target_ratio: float, gains: Mapping[Hashable, Sequence[float]],
) -> dict[Hashable, int]:
    """Allocate rank by marginal error reduction per parameter.

    ``gains[key][j]`` is the error energy removed by rank unit ``j+1`` of that projection
    (e.g. the sum over experts of the (whitened) residual's ``σ_{j+1}²``, normalized by the
    projection's original energy; for the wrapper form use the energy of two delta units).
    Every projection starts at rank 1; then units go, one at a time, to the projection with
    the largest ``gain / unit cost`` that still fits the budget.  Total ``<= target``.
    """
    target = _target(shapes, target_ratio)
    ranks = {p.key: 1 for p in shapes}
    used = total_params(form, shapes, ranks)
    if used > target:
        raise _unreachable(form, shapes, target_ratio)
    by_key = {p.key: p for p in shapes}
    heap: list[tuple[float, int, Hashable]] = []

    def push(key: Hashable, order: int) -> None:
        p, r = by_key[key], ranks[key]
        g = gains[key]
        if r < p.max_rank:
            gain = float(g[r]) if r < len(g) else 0.0
            heapq.heappush(heap, (-gain / rank_unit_params(form, p), order, key))

    for i, p in enumerate(shapes):
        push(p.key, i)
    order = len(shapes)
    while heap:
        _, _, key = heapq.heappop(heap)
        cost = rank_unit_params(form, by_key[key])
        if used + cost > target:
            continue  # this projection no longer fits; a cheaper one may
        ranks[key] += 1
        used += cost
        order += 1
        push(key, order)
    return ranks


def active_macs_per_token(form: FormLike, shapes: Sequence[ProjectionShape], ranks: Mapping[Hashable, int],
                          top_k: int) -> int:
    """Multiply-adds per token of the compressed experts' matrix products (elementwise ops
    not counted), the form's :meth:`~moecore.forms.Form.active_macs_per_token` summed over
    ``shapes``.  Delta: each core once per token + ``k`` low-rank paths ``s(d_out+d_in)``;
    wrapper: ``k`` core runs + ``k`` wrappers ``2r(d_out+d_in)``."""
    f = form_counts(form)
    return sum(f.active_macs_per_token(p.d_out, p.d_in, ranks[p.key] * f.rank_unit_params(p.d_out, p.d_in), top_k)
               for p in shapes)


def original_macs_per_token(shapes: Sequence[ProjectionShape], top_k: int) -> int:
    """Multiply-adds per token of the original experts: ``k · Σ d_out·d_in``."""
    return top_k * sum(p.d_out * p.d_in for p in shapes)
