"""The typed configs of every verb (issue 11): validation, format versions, JSON files, and the
command-line flags derived from the dataclass fields (no model, except one tiny checkpoint
whose moecore_config.json comes from a newer moecore)."""
from __future__ import annotations

import dataclasses
import json

import pytest
from transformers import AutoModelForCausalLM

import moecore
from moecore import __version__
from moecore.cli import build_parser, main
from moecore.cli._config_args import config_from_args
from moecore.cli.commands import BUDGET_FIELDS
from moecore.config import CompressionConfig, QuantConfig
from moecore.config_base import field_types, unwrap_optional
from moecore.errors import ConfigError, MoecoreError
from moecore.training.config import DistillConfig, RecoveryConfig

from ._tiny_models import tiny_mixtral

CONFIGS = [CompressionConfig, DistillConfig, RecoveryConfig]


@pytest.mark.parametrize("cls", CONFIGS)
def test_roundtrip_save_load_and_format_version(cls, tmp_path):
    cfg = cls()
    d = cfg.to_dict()
    assert d["format_version"] == cls.FORMAT_VERSION == 1
    assert cls.from_dict(d) == cfg
    path = cfg.save(tmp_path)
    assert path.name == cls.FILENAME
    data = json.loads(path.read_text())
    assert data["moecore_version"] == __version__ and data["format_version"] == 1
    assert cls.load(tmp_path) == cfg and cls.load(path) == cfg
    # written before format versions existed: no key means version 1
    old = {k: v for k, v in data.items() if k != "format_version"}
    assert cls.from_dict(old) == cfg
    # a newer format is refused with a message saying what to do
    path.write_text(json.dumps({**data, "format_version": 2, "new_field": 1}))
    with pytest.raises(ConfigError, match=r"format version 2, newer than this moecore .* upgrade moecore"):
        cls.load(tmp_path)
    with pytest.raises(ConfigError, match="invalid format_version"):
        cls.from_dict({**d, "format_version": "1"})
    with pytest.raises(ConfigError, match="unknown .*bogus"):
        cls.from_dict({**d, "bogus": 1})


@pytest.mark.parametrize("cls,kwargs,match", [
    (DistillConfig, {"max_steps": 0}, "max_steps must be > 0"),
    (DistillConfig, {"lr": -1.0}, "lr must be > 0"),
    (DistillConfig, {"lr": "1e-3"}, "lr must be a number"),
    (DistillConfig, {"block_size": 1}, "block_size must be >= 2"),
    (DistillConfig, {"alpha": -0.5}, "alpha must be >= 0"),
    (DistillConfig, {"batch_size": 2.0}, "batch_size must be an integer"),
    (DistillConfig, {"train_core": 1}, "train_core must be true or false"),
    (DistillConfig, {"scheduler": "step"}, "scheduler must be one of"),
    (DistillConfig, {"save_total_limit": 0}, "save_total_limit must be > 0"),
    (DistillConfig, {"eval_tasks": []}, "eval_tasks is empty"),
    (DistillConfig, {"eval_tasks": [1]}, "eval_tasks must be a list of strings"),
    (RecoveryConfig, {"steps": -1}, "steps must be >= 0"),
    (RecoveryConfig, {"batch_tokens": 0}, "batch_tokens must be > 0"),
    (RecoveryConfig, {"seq_len": None}, "seq_len must not be None"),
    (CompressionConfig, {"expert_chunk": 0}, "expert_chunk must be > 0"),
    (CompressionConfig, {"fit_memory_gb": 0}, "fit_memory_gb must be > 0"),
])
def test_bad_values_are_config_errors(cls, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        cls(**kwargs)


FLOAT_FIELDS = [(cls, name) for cls in CONFIGS + [QuantConfig]
                for name, tp in field_types(cls).items() if unwrap_optional(tp)[0] is float]


@pytest.mark.parametrize("cls,name", FLOAT_FIELDS, ids=[f"{c.__name__}.{n}" for c, n in FLOAT_FIELDS])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_numbers_are_refused(cls, name, bad):
    """NaN passes every ``v < min`` comparison; no float field of any config takes it, nor inf."""
    with pytest.raises(ConfigError, match=rf"^{name} must be a finite number, got {bad!r}"):
        cls(**{name: bad})


def test_non_finite_flag_is_one_line_error(capsys, tmp_path, root):
    assert main(["compress", str(root / "models" / "tiny-mixtral"), "-o", str(tmp_path / "o"),
                 "--whiten-damping", "nan"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["moecore compress: error: whiten_damping must be a finite number, got nan"]
    assert not (tmp_path / "o").exists()


def test_values_are_normalised():
    cfg = DistillConfig(lr=1, eval_tasks="a, b")
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.eval_tasks == ["a", "b"]
    assert DistillConfig(eval_tasks=("x",)).changes(DistillConfig()) == {"eval_tasks": (None, ["x"])}


def _sub(parser, name):
    return next(a for a in parser._actions if a.dest == "command").choices[name]


@pytest.mark.parametrize("command,cls,only", [
    ("compress", CompressionConfig, None), ("distill", DistillConfig, None), ("recover", RecoveryConfig, None),
    ("distill", CompressionConfig, BUDGET_FIELDS), ("plan", CompressionConfig, BUDGET_FIELDS),
])
def test_every_field_has_a_flag_with_its_default_and_help(command, cls, only):
    sub = _sub(build_parser(), command)
    dests = {a.dest: a for a in sub._actions}
    for f in dataclasses.fields(cls):
        if only is not None and f.name not in only:
            continue
        if f.name == "quant":
            for q in dataclasses.fields(QuantConfig):
                assert f"quant.{q.name}" in dests, q.name
            continue
        action = dests[f.name]
        assert action.help, f.name
        if f.default is True:  # a --flag / --no-flag pair
            assert "(default: on)" in action.help, (f.name, action.help)
        elif f.default is not None and f.default is not False:
            assert f"(default: {f.default})" in action.help, (f.name, action.help)
    # nothing given: exactly the dataclass defaults (every default lives in the dataclass)
    required = {"compress": ["M", "-o", "O"], "distill": ["--teacher", "T", "-o", "O"],
                "recover": ["--teacher", "T", "--student", "S", "-o", "O"], "plan": ["c.json"]}[command]
    args = build_parser().parse_args([command, *required])
    assert config_from_args(cls, args, only=only) == cls()


def test_flags_build_the_config():
    p = build_parser()
    args = p.parse_args(["compress", "M", "-o", "O", "--rank", "8", "--calib-tokens", "1024", "--refine-steps", "2",
                         "--core-bits", "4", "--quant-group", "32", "--svd", "exact", "--whiten-damping", "0.1"])
    cfg = config_from_args(CompressionConfig, args)
    assert (cfg.rank, cfg.target_ratio, cfg.calib_max_tokens, cfg.refine_steps, cfg.svd, cfg.whiten_damping) == \
        (8, None, 1024, 2, "exact", 0.1)
    assert cfg.quant == QuantConfig(core_bits=4, factor_bits=None, group_size=32)  # a bit width not given: float
    args = p.parse_args(["distill", "--teacher", "T", "-o", "O", "--max-steps", "30", "--train-core", "--eval-tasks",
                         "a,b", "--target-ratio", "0.5", "--seed", "3"])
    kd = config_from_args(DistillConfig, args)
    assert (kd.max_steps, kd.train_core, kd.eval_tasks, kd.seed) == (30, True, ["a", "b"], 3)
    assert DistillConfig().train_core  # the default since RESULTS §4b: cores train with the factors
    no_core = p.parse_args(["distill", "--teacher", "T", "-o", "O", "--no-train-core"])
    assert config_from_args(DistillConfig, no_core).train_core is False
    comp = config_from_args(CompressionConfig, args, only=BUDGET_FIELDS, none_if_unset=True)
    assert comp.target_ratio == 0.5 and comp.seed == 0  # --seed belongs to the distill config
    args = p.parse_args(["distill", "--teacher", "T", "--student", "S", "-o", "O"])
    assert config_from_args(CompressionConfig, args, only=BUDGET_FIELDS, none_if_unset=True) is None
    args = p.parse_args(["recover", "--teacher", "T", "--student", "S", "-o", "O", "--steps", "5", "--train-core"])
    assert config_from_args(RecoveryConfig, args) == RecoveryConfig(steps=5, train_core=True)
    with pytest.raises(ConfigError, match="core_bits must be one of"):
        config_from_args(CompressionConfig, p.parse_args(["compress", "M", "-o", "O", "--core-bits", "5"]))


def test_a_checkpoint_from_a_newer_moecore_says_to_upgrade(tmp_path):
    """moecore_config.json is read back when a compressed checkpoint loads: a newer format is refused."""
    model, tok = tiny_mixtral(seed=0)
    moecore.compress(model, CompressionConfig(rank=2, refine_steps=0), progress=False)
    out = moecore.save_compressed(model, tmp_path / "c", tokenizer=tok)
    assert AutoModelForCausalLM.from_pretrained(out).moecore_config == CompressionConfig(rank=2, refine_steps=0)
    f = out / "moecore_config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), "format_version": 9}))
    with pytest.raises(MoecoreError, match="format version 9, newer than this moecore .* upgrade moecore"):
        AutoModelForCausalLM.from_pretrained(out)
