"""The form registry (:mod:`moecore.forms`): every registered form's counts against the real
tensors of a built ``CompressedExperts`` and a directly counted computation, unknown names,
and that nothing outside ``moecore/forms`` branches on a form name."""
from __future__ import annotations

import dataclasses
import io
import re
import tokenize
from pathlib import Path

import pytest
import torch

import moecore
from moecore.compressed_experts import CompressedExperts
from moecore.config import CompressionConfig
from moecore.errors import ConfigError
from moecore.families import FUSED as _FUSED
from moecore.families import GPT_OSS
from moecore.forms import FORMS, PROJECTIONS, Form, get_form
from moecore.maths import budget

SRC = Path(moecore.__file__).resolve().parent
E, H, F, K = 8, 12, 20, 3  # E: a multiple of 4, the basis form's group
RANKS = {"gate": 2, "up": 4, "down": 3}
F64 = torch.float64
FUSED = dataclasses.replace(_FUSED, hidden_act="silu")


def _random(form: str, layout=FUSED, split: str = "uniform") -> CompressedExperts:
    """Random cores and factors; a form's index tensors (the ragged form's per-expert ranks)
    split each projection's ``E·s`` rank units evenly or at random (``split``)."""
    m = CompressedExperts(E, H, F, form, RANKS, layout, dtype=F64)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=F64) * 0.3)
        for p in PROJECTIONS:
            for n in m.form_impl.index_param_names(p):
                pick = torch.randint(0, E, (E * RANKS[p],), generator=g) if split == "random" else \
                    torch.arange(E).repeat_interleave(RANKS[p])
                getattr(m, n).copy_(torch.bincount(pick, minlength=E))
    return m


def test_registry_has_both_forms_and_every_module_registers_one():
    assert list(FORMS) == ["basis", "delta", "ragged", "wrapper"]
    modules = sorted(p.stem for p in (SRC / "forms").glob("*.py") if p.stem not in ("__init__", "base"))
    assert sorted(f.__module__.rsplit(".", 1)[1] for f in map(type, FORMS.values())) == modules
    for name, form in FORMS.items():
        assert isinstance(form, Form) and form.name == name and get_form(name) is form


@pytest.mark.parametrize("name", list(FORMS))
@pytest.mark.parametrize("layout", [FUSED, GPT_OSS], ids=["fused", "gpt_oss"])
def test_param_counts_equal_the_built_modules_numel(name, layout):
    form = get_form(name)
    m = CompressedExperts(E, H, F, name, RANKS, layout, device="meta")
    params = dict(m.named_parameters())
    total = 0
    for p in PROJECTIONS:
        d_out, d_in = m.proj_shape(p)
        names = [f"core_{p}", *form.param_names(p)]
        real = sum(params[n].numel() for n in names)
        assert real == form.projection_params(E, d_out, d_in, RANKS[p])
        assert real == budget.projection_params(name, budget.ProjectionShape(p, E, d_out, d_in), RANKS[p])
        assert real == budget.projection_params(form, budget.ProjectionShape(p, E, d_out, d_in), RANKS[p])
        one_more = CompressedExperts(E, H, F, name, {**RANKS, p: RANKS[p] + 1}, layout, device="meta")
        added = sum(t.numel() for t in one_more.parameters()) - sum(t.numel() for t in m.parameters())
        assert added == E * form.rank_unit_params(d_out, d_in) == budget.rank_unit_params(
            name, budget.ProjectionShape(p, E, d_out, d_in))
        total += real
    biases = {"bias_gate_up", "bias_down"} if layout.has_bias else set()
    assert set(params) == {f"core_{p}" for p in PROJECTIONS} | {n for p in PROJECTIONS for n in form.param_names(p)} | biases
    assert total + sum(params[b].numel() for b in biases) == sum(t.numel() for t in m.parameters())


class _Counter:
    """Matrix-vector products that count their multiply-adds."""

    def __init__(self) -> None:
        self.macs = 0

    def mv(self, m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.macs += m.shape[0] * m.shape[1]
        return m @ v


def _delta_mix(m, p, c, experts, xs, ws):
    """``Σ_j w_j (C + A_j B_jᵀ) x_j`` as the delta forward computes it: the core once (on
    ``Σ w_j x_j``; linear), the low-rank path per pair."""
    core = getattr(m, f"core_{p}")
    a_name, b_name = get_form("delta").param_names(p)
    y = c.mv(core, sum(w * x for w, x in zip(ws, xs)))
    for e, x, w in zip(experts, xs, ws):
        y = y + w * c.mv(getattr(m, a_name)[e], c.mv(getattr(m, b_name)[e].mT, x))
    return y


def _wrapper_mix(m, p, c, experts, xs, ws):
    """``Σ_j w_j (I + U_o V_oᵀ) C (I + U_i V_iᵀ) x_j``, the core once per pair."""
    core = getattr(m, f"core_{p}")
    u_in, v_in, u_out, v_out = (getattr(m, n) for n in get_form("wrapper").param_names(p))
    y = 0
    for e, x, w in zip(experts, xs, ws):
        xi = x + c.mv(u_in[e], c.mv(v_in[e].mT, x))
        z = c.mv(core, xi)
        y = y + w * (z + c.mv(u_out[e], c.mv(v_out[e].mT, z)))
    return y


def _ragged_mix(m, p, c, experts, xs, ws):
    """The delta maths with expert ``j``'s columns ``[start_j, start_j + r_j)`` of the side-by-side factors."""
    core = getattr(m, f"core_{p}")
    a_name, b_name = get_form("ragged").param_names(p)
    r = getattr(m, get_form("ragged").index_param_names(p)[0]).long()
    start = torch.cumsum(r, 0) - r
    y = c.mv(core, sum(w * x for w, x in zip(ws, xs)))
    for e, x, w in zip(experts, xs, ws):
        cols = slice(int(start[e]), int(start[e] + r[e]))
        y = y + w * c.mv(getattr(m, a_name)[:, cols], c.mv(getattr(m, b_name)[:, cols].mT, x))
    return y


def _basis_mix(m, p, c, experts, xs, ws):
    """The core once; per pair the expert's narrow factor and its group's (4 experts) wide basis:
    ``A_i (B_gᵀ x)`` when the input side is the wide one, ``B_g (A_iᵀ x)`` otherwise."""
    core = getattr(m, f"core_{p}")
    a_name, b_name = get_form("basis").param_names(p)
    y = c.mv(core, sum(w * x for w, x in zip(ws, xs)))
    d_out, d_in = core.shape
    for e, x, w in zip(experts, xs, ws):
        a, b = getattr(m, a_name)[e], getattr(m, b_name)[e // 4]  # (narrow, s), (wide, s)
        y = y + w * (c.mv(a, c.mv(b.mT, x)) if d_in >= d_out else c.mv(b, c.mv(a.mT, x)))
    return y


DIRECT = {"basis": _basis_mix, "delta": _delta_mix, "ragged": _ragged_mix, "wrapper": _wrapper_mix}


@pytest.mark.parametrize("name", list(FORMS))
def test_macs_formula_matches_a_direct_count(name):
    """One token routed to K experts, every projection computed with counted matrix-vector
    products (checked against the dense expert weights); the count is the formula's."""
    assert set(DIRECT) == set(FORMS), "a new form needs its directly counted computation here"
    m = _random(name)
    g = torch.Generator().manual_seed(1)
    experts, ws = [0, 3, 4], torch.rand(K, generator=g, dtype=F64).tolist()
    c = _Counter()
    with torch.no_grad():
        for p in PROJECTIONS:
            d_out, d_in = m.proj_shape(p)
            xs = [torch.randn(d_in, generator=g, dtype=F64) for _ in range(K)]  # per pair (down: differ)
            got = DIRECT[name](m, p, c, experts, xs, ws)
            dense = m.expert_weights(p)  # (E, d_out, d_in)
            want = sum(w * dense[e] @ x for e, x, w in zip(experts, xs, ws))
            assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    assert c.macs == m.active_macs_per_token(K)
    shapes = m.projection_shapes()
    assert c.macs == budget.active_macs_per_token(name, shapes, {s.key: RANKS[s.key[1]] for s in shapes}, K)


@pytest.mark.parametrize("name", list(FORMS))
def test_reconstruct_and_operands_are_the_forms(name):
    form, m = get_form(name), _random(name, split="random")
    for p in PROJECTIONS:
        factors = tuple(getattr(m, n) for n in form.factor_tensor_names(p))
        assert torch.equal(m.expert_weights(p), form.reconstruct(getattr(m, f"core_{p}"), factors))
    assert set(m._operands()) == set(form.fused_operands(m.stored, m.ranks))


def test_unknown_form_is_a_config_error_naming_the_known_ones():
    for call in (lambda: get_form("lora"), lambda: budget.projection_params("lora", budget.ProjectionShape("x", 2, 4, 4), 1),
                 lambda: CompressionConfig(form="lora"), lambda: CompressedExperts(E, H, F, "lora", RANKS, FUSED)):
        with pytest.raises(ConfigError, match=r"form must be one of 'basis', 'delta', 'ragged', 'wrapper', got 'lora'"):
            call()


def _code_files():
    return sorted(p for p in SRC.rglob("*.py") if "forms" not in p.relative_to(SRC).parts)


def test_no_form_name_branches_outside_the_forms_package():
    """No ``form == "..."`` / ``form != "..."`` comparison anywhere in the package, and no form
    name as a string literal in code outside ``moecore/forms`` (docstrings and comments are
    single tokens of their own, so they do not count)."""
    compare = re.compile(r"""form\w*\s*[!=]=\s*["']|["']\s*[!=]=\s*\w*form\b""")
    for path in sorted(SRC.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        assert not compare.search(text), f"{path}: compares a form with a string"
    for path in _code_files():
        toks = tokenize.generate_tokens(io.StringIO(path.read_text(encoding="utf-8")).readline)
        literals = [t for t in toks if t.type == tokenize.STRING and t.string.strip("\"'") in FORMS]
        assert not literals, f"{path}:{literals[0].start[0]}: form name {literals[0].string} outside moecore/forms"


def test_no_stored_name_outside_the_forms_package():
    """Issue 19: no module outside ``moecore/forms`` spells a form's stored factor names (or a
    quantized part of one) in code: grouped, quant, stats, modeling and training ask the form."""
    stems = {stem for form in FORMS.values() for stem in form.factor_names}
    for path in _code_files():
        toks = tokenize.generate_tokens(io.StringIO(path.read_text(encoding="utf-8")).readline)
        code = [t for t in toks if t.type == tokenize.STRING and not t.string.startswith(('"""', "r\"\"\""))]
        named = [t for t in code if any(stem in t.string for stem in stems)]
        assert not named, f"{path}:{named[0].start[0]}: {named[0].string} names a form's factor outside moecore/forms"


def test_one_projections_constant():
    defined = [p for p in SRC.rglob("*.py") if re.search(r"^PROJECTIONS\s*=", p.read_text(encoding="utf-8"), re.M)]
    assert defined == [SRC / "forms" / "base.py"]


@pytest.mark.parametrize("name", ["delta", "ragged", "basis"])
def test_to_stored_at_a_dtype_equals_casting_the_fitted_factors_first(name):
    """The fit stores its factors at the model's dtype through ``to_stored(..., dtype=)``: the
    same bits as casting the float32 stacks first (what it did before, at DeepSeek-V3's shape a
    3.7 GB padded copy), and the ragged form's compact columns are each expert's first
    ``ranks[i]`` columns, side by side."""
    form, g = get_form(name), torch.Generator().manual_seed(1)
    width = form.svd_width(3)
    fac = [torch.randn(E, H, width, generator=g), torch.randn(E, F, width, generator=g)]
    if name == "ragged":
        ranks = torch.tensor([0, 6, 3, 1, 2, 5, 4, 3])  # 24 = E x 3 rank units, one expert at 0
        fac = [f * (torch.arange(width) < ranks[:, None, None]) for f in fac]  # zero past each rank
        fac.append(ranks)
    rank, got = form.to_stored(E, tuple(fac), dtype=torch.bfloat16)
    rank0, ref = form.to_stored(E, tuple(f.to(torch.bfloat16) if f.is_floating_point() else f for f in fac))
    assert rank == rank0 == 3 and len(got) == len(ref)
    for a, b in zip(got, ref):
        assert a.dtype == b.dtype and torch.equal(a, b)
    if name == "ragged":
        cols = torch.cat([fac[0][i, :, :r] for i, r in enumerate(ranks.tolist())], 1)
        assert torch.equal(got[0], cols.to(torch.bfloat16)) and got[2].dtype == torch.int32
