"""The command line's wording (issue 18): ``moecore compress --help`` in two groups with every
default shown, ``plan --json | head`` without a traceback, plan's names and memory estimate,
and lm-eval's git call without "fatal: not a git repository" on stderr."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from moecore.cli import main
from moecore.evaluation.lm_eval_tasks import _quiet_git_hash

from ._tiny_models import ROOT, python_cmd, subprocess_env

MIXTRAL = ROOT / "examples" / "configs" / "mixtral-8x7b.json"


def help_sections(text: str) -> dict[str, dict[str, str]]:
    """``{group heading: {option: its help text}}`` of an argparse help page."""
    sections: dict[str, dict[str, str]] = {}
    group = option = None
    for line in text.splitlines():
        if line and not line.startswith(" ") and line.endswith(":"):
            group, option = line[:-1], None
            sections[group] = {}
        elif group and re.match(r"^  \S", line):
            option = line.split()[0].rstrip(",")
            sections[group][option] = line.strip()[len(option):]
        elif group and option and line.startswith("    "):
            sections[group][option] += " " + line.strip()
        elif not line.strip():
            group = option = None
    return sections


def test_compress_help_has_two_groups_and_every_default(capsys):
    with pytest.raises(SystemExit):
        main(["compress", "--help"])
    text = capsys.readouterr().out
    sections = help_sections(text)
    essential = next(v for k, v in sections.items() if k.startswith("essential"))
    advanced = next(v for k, v in sections.items() if k.startswith("advanced"))
    assert list(essential) == ["model", "-o", "--calib", "--no-calib", "--form", "--rank", "--target-ratio", "--dtype", "--device",
                               "--resume", "--overwrite", "-h"]
    assert {"--whiten-damping", "--gram-dtype", "--expert-chunk", "--fit-memory-gb", "--quant-group"} <= set(advanced)
    for name, body in {**essential, **advanced}.items():
        if name != "-h":
            assert "(default:" in " ".join(body.split()) or "(required)" in body, (name, body)
    fit = " ".join(advanced["--fit-memory-gb"].split())
    assert "GPU memory" in fit and "host RAM" in fit
    assert advanced["--quant-group"].split()[0] == "QUANT_GROUP"
    assert "docs/GLOSSARY.md" in text and (ROOT / "docs" / "GLOSSARY.md").is_file()


def test_plan_json_into_a_closed_pipe_ends_quietly():
    """``moecore plan --json | head -1``: no BrokenPipeError traceback."""
    cmd = " ".join(map(repr, python_cmd("plan", str(MIXTRAL), "--json"))) + " | head -1"
    r = subprocess.run(["bash", "-c", cmd], env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert r.stdout.strip() == "{"
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr


def test_lm_eval_git_call_prints_nothing_outside_a_repository(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    _quiet_git_hash()
    assert "fatal" not in capfd.readouterr().err


def test_plan_names_folders_estimates_memory_and_warns_about_quantized_sources(tmp_path, capsys):
    config = json.loads(MIXTRAL.read_text())
    for name in ("alpha", "beta"):
        (tmp_path / "cfgs" / name).mkdir(parents=True)
        (tmp_path / "cfgs" / name / "config.json").write_text(json.dumps(config))
    fp8 = {**config, "quantization_config": {"quant_method": "fp8", "fmt": "e4m3"}}
    (tmp_path / "cfgs" / "beta" / "config.json").write_text(json.dumps(fp8))
    assert main(["plan", str(tmp_path / "cfgs" / "alpha"), str(tmp_path / "cfgs" / "beta" / "config.json"),
                 "--rank", "64"]) == 0
    out, err = capsys.readouterr()
    assert re.search(r"^alpha: output [\d.]+ GB on disk \(bfloat16\); compress peak .*GPU [\d.]+ GiB", out, re.M)
    assert re.search(r"^beta: output", out, re.M) and "cfgs" not in out
    assert "warning" in err and "stored quantized (fp8)" in err and "bfloat16" in err
    main(["plan", str(tmp_path / "cfgs" / "alpha"), "--rank", "64", "--dtype", "float32", "--json"])
    est = json.loads(capsys.readouterr().out)[str(tmp_path / "cfgs" / "alpha")]["memory_estimate"]
    assert est["dtype"] == "float32" and est["gpu_gib"] > 1 and est["host_gib_cpu_only"] > est["gpu_gib"]


def test_a_model_larger_than_the_gpu_is_placed_with_device_map_auto(monkeypatch):
    """``eval`` places a model with ``device_map="auto"`` exactly when its weights, at the dtype
    it is loaded in, exceed 90% of the CUDA device's free memory (no GPU here: the free
    memory is what CUDA would report)."""
    import torch

    from moecore.cli.common import placement

    model = ROOT / "models" / "tiny-mixtral"  # 22.6 MB of bf16 safetensors (45 MB in float32)
    size = (model / "model.safetensors").stat().st_size
    free = {"bytes": 0}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 80 << 30))
    cuda = torch.device("cuda", 0)
    free["bytes"] = 10 * size
    assert placement(model, cuda, "auto") == {} and placement(model, cuda, torch.float32) == {}
    free["bytes"] = int(1.5 * size)  # the bf16 weights fit, twice their size in float32 does not
    assert placement(model, cuda, torch.bfloat16) == {}
    assert placement(model, cuda, torch.float32) == {"device_map": "auto"}
    free["bytes"] = size // 2
    assert placement(model, cuda, "auto") == {"device_map": "auto"}
    assert placement(model, torch.device("cpu"), torch.float32) == {}  # a CPU load is never dispatched
