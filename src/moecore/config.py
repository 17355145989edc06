"""``CompressionConfig``: the one typed, validated configuration of :func:`moecore.compress`.

It is validated on creation (``ConfigError`` with a clear message) and saved next to the
weights as ``moecore_config.json`` together with the moecore version.  Checks that need the
real model shapes (rank larger than ``min(d_in, d_out)``, an unreachable ``target_ratio``)
happen in :mod:`moecore.maths.budget` / :func:`moecore.compress`, naming the projection.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .io_utils import atomic_write_text
from .errors import ConfigError

CONFIG_FILENAME = "moecore_config.json"

_CHOICES = {
    "form": ("delta", "wrapper"),
    "core": ("auto", "mean", "frequency", "output"),
    "calib_weighting": ("tokens", "routing"),
    "init": ("auto", "svd", "whitened"),
    "allocation": ("uniform", "greedy"),
    "svd": ("auto", "exact", "randomized"),
    "gram_dtype": ("auto", "float64", "float32"),
    "propagate": ("compressed", "original"),
}


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


QUANT_BITS = (2, 3, 4, 8)
QUANT_METHODS = ("hqq", "rtn")


@dataclass
class QuantConfig:
    """Weight format of the stored core and factors (delta form; :mod:`moecore.quant`).

    Attributes:
        core_bits: bits per core weight (2, 3, 4 or 8), or ``None`` to keep the core in float.
        factor_bits: bits per factor weight (2, 3, 4 or 8), or ``None`` to keep the factors in
            float (then ``moecore distill`` trains them against the frozen quantized core).
        group_size: weights per (scale, zero point) group, along each matrix's input side for
            the core and along each factor column.
        method: ``"hqq"`` (half-quadratic optimized scale/zero, the HQQ library) or ``"rtn"``
            (round-to-nearest min/max, same library and storage).
    """

    core_bits: int | None = 4
    factor_bits: int | None = 8
    group_size: int = 64
    method: str = "hqq"

    def __post_init__(self) -> None:
        for name in ("core_bits", "factor_bits"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v not in QUANT_BITS):
                raise ConfigError(f"quant.{name} must be one of {', '.join(map(str, QUANT_BITS))} or None, got {v!r}")
        if self.core_bits is None and self.factor_bits is None:
            raise ConfigError("quant needs core_bits or factor_bits (or use quant=None for float storage)")
        if not _is_int(self.group_size) or not 8 <= self.group_size <= 4096:
            raise ConfigError(f"quant.group_size must be an integer in [8, 4096], got {self.group_size!r}")
        if self.method not in QUANT_METHODS:
            raise ConfigError(f"quant.method must be one of {', '.join(map(repr, QUANT_METHODS))}, got {self.method!r}")

    @classmethod
    def coerce(cls, value: Any) -> "QuantConfig | None":
        """``None``, a ``QuantConfig`` or its dict -> ``QuantConfig | None`` (ConfigError otherwise)."""
        if value is None or isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"quant must be a QuantConfig, a dict or None, got {type(value).__name__}")
        unknown = sorted(set(value) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"unknown quant key(s): {', '.join(unknown)}")
        return cls(**value)


@dataclass
class CompressionConfig:
    """How to compress every MoE layer's experts.

    Attributes:
        form: ``"delta"`` (W_i ≈ C + A_i B_iᵀ, core applied once per token) or ``"wrapper"``
            (the seed's W_i ≈ (I + U_out V_outᵀ) C (I + U_in V_inᵀ)).
        rank: the form's own rank for every projection (delta: s, wrapper: r per side).
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
        svd: ``"exact"`` (``torch.linalg.svd``), ``"randomized"`` (range finder with
            oversampling and power iterations, warm-started across refinement steps) or
            ``"auto"`` (default): exact when the projection's short side is at most 512,
            randomized above (every real-scale MoE layer).
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
        fit_memory_gb: working memory for fitting one projection; experts are processed in
            chunks that fit it.  ``expert_chunk`` fixes the chunk size instead.
        quant: ``None`` (float storage) or a :class:`QuantConfig` (or its dict): quantized core
            and/or factors, the factors refit after the core is quantized (delta form only).
    """

    form: str = "delta"
    rank: int | None = None
    target_ratio: float | None = None
    core: str = "auto"
    init: str = "auto"
    allocation: str = "uniform"
    svd: str = "auto"
    refine_steps: int = 10
    calib_max_tokens: int = 32768
    calib_seq_len: int = 512
    seed: int = 0
    whiten_damping: float = 0.01
    calib_weighting: str = "routing"
    propagate: str = "original"
    calib_prior_tokens: float = 64.0
    gram_dtype: str = "auto"
    fit_memory_gb: float = 6.0
    expert_chunk: int | None = None
    quant: QuantConfig | None = None

    def __post_init__(self) -> None:
        for name, choices in _CHOICES.items():
            value = getattr(self, name)
            if value not in choices:
                raise ConfigError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
        if self.rank is not None and self.target_ratio is not None:
            raise ConfigError("give either rank or target_ratio, not both")
        if self.rank is None and self.target_ratio is None:
            self.target_ratio = 0.25
        if self.rank is not None:
            if not _is_int(self.rank):
                raise ConfigError(f"rank must be an integer, got {self.rank!r}")
            if self.rank <= 0:
                raise ConfigError(f"rank must be > 0, got {self.rank}")
        if self.target_ratio is not None:
            if not _is_number(self.target_ratio):
                raise ConfigError(f"target_ratio must be a number, got {self.target_ratio!r}")
            self.target_ratio = float(self.target_ratio)
            if not 0.0 < self.target_ratio < 1.0:
                raise ConfigError(
                    f"target_ratio must be in (0, 1) (a fraction of the original expert parameters), "
                    f"got {self.target_ratio}"
                )
        for name in ("refine_steps", "seed"):
            v = getattr(self, name)
            if not _is_int(v) or v < 0:
                raise ConfigError(f"{name} must be an integer >= 0, got {v!r}")
        for name in ("calib_max_tokens", "calib_seq_len"):
            v = getattr(self, name)
            if not _is_int(v) or v <= 0:
                raise ConfigError(f"{name} must be an integer > 0, got {v!r}")
        if not _is_number(self.whiten_damping) or self.whiten_damping < 0:
            raise ConfigError(f"whiten_damping must be a number >= 0, got {self.whiten_damping!r}")
        self.whiten_damping = float(self.whiten_damping)
        for name in ("calib_prior_tokens", "fit_memory_gb"):
            v = getattr(self, name)
            if not _is_number(v) or v < 0 or (name == "fit_memory_gb" and v <= 0):
                raise ConfigError(f"{name} must be a number {'> 0' if name == 'fit_memory_gb' else '>= 0'}, got {v!r}")
            setattr(self, name, float(v))
        if self.expert_chunk is not None and (not _is_int(self.expert_chunk) or self.expert_chunk <= 0):
            raise ConfigError(f"expert_chunk must be a positive integer or None, got {self.expert_chunk!r}")
        self.quant = QuantConfig.coerce(self.quant)
        if self.quant is not None and self.form != "delta":
            raise ConfigError("quant is supported for form='delta' only (the wrapper's factors multiply the core)")

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CompressionConfig":
        """Build (and validate) a config from :meth:`to_dict` output.  Unknown keys are an
        error (``moecore_version`` is accepted and ignored)."""
        if not isinstance(data, dict):
            raise ConfigError(f"compression config must be a dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in data.items() if k != "moecore_version"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown compression config key(s): {', '.join(unknown)}")
        return cls(**data)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``moecore_config.json`` (config + ``moecore_version``) atomically into
        ``directory`` and return its path."""
        from . import __version__

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        payload = {"moecore_version": __version__, **self.to_dict()}
        atomic_write_text(d / CONFIG_FILENAME, json.dumps(payload, indent=2, sort_keys=True) + "\n")
        return d / CONFIG_FILENAME

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "CompressionConfig":
        """Read ``moecore_config.json`` from ``directory`` (or the file itself)."""
        p = Path(directory)
        if p.is_dir():
            p = p / CONFIG_FILENAME
        if not p.is_file():
            raise ConfigError(f"no {CONFIG_FILENAME} at {p}")
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{p} is not valid JSON: {exc}") from exc
        return cls.from_dict(data)
