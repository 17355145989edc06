"""The ``moecore compress / stats / plan / export`` commands: a good run end to end, and bad
inputs -> exit code 2 with a one-line ``moecore X: error: ...`` and no traceback."""
from __future__ import annotations

import json
import re
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import moecore
from moecore.cli import main
from moecore.checkpoint_format import LOAD_NOTICE_KEY

from ._tiny_models import save_tiny, tokenizer

ROOT = Path(__file__).resolve().parents[1]
MIXTRAL = ROOT / "examples" / "configs" / "mixtral-8x7b.json"
QWEN3 = ROOT / "examples" / "configs" / "qwen3-30b-a3b.json"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny Mixtral directory, a non-MoE Llama directory and a calibration file."""
    root = tmp_path_factory.mktemp("cli")
    save_tiny(root / "base", hidden=32, layers=2, experts=4)
    tok = tokenizer()
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48,
                                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    llama.save_pretrained(root / "llama")
    tok.save_pretrained(root / "llama")
    (root / "calib.txt").write_text("In the beginning God created the heaven and the earth.\n\n"
                                    "And the earth was without form, and void; and darkness was upon the deep.\n")
    (root / "empty.txt").write_text("\n\n  \n")
    (root / "bad.jsonl").write_text('{"text": "In the beginning."}\n{"text": 5}\n')
    (root / "o13").mkdir()  # an existing output, kept without --overwrite
    return root


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def error_lines(err: str) -> list[str]:
    """stderr minus progress output (status lines and transformers' progress bars)."""
    return [line for line in err.splitlines()
            if line.strip() and not line.startswith("moecore: ") and "Loading weights" not in line]


def assert_one_line_error(rc: int, err: str, command: str, match: str) -> None:
    lines = error_lines(err)
    assert rc == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"moecore {command}: error: ") and match in lines[0], lines[0]


def test_compress_stats_export_end_to_end(work, capsys):
    out = work / "comp"
    rc, stdout, _ = run_cli(capsys, "compress", work / "base", "-o", out, "--form", "delta", "--target-ratio", "0.5",
                            "--calib", work / "calib.txt")
    assert rc == 0 and "saved compressed model" in stdout
    cfg = moecore.CompressionConfig.load(out)
    assert cfg.form == "delta" and cfg.target_ratio == 0.5
    assert {"model.safetensors", "config.json", "moecore_config.json", "compression_statistics.yaml",
            "tokenizer.json", "README.md"} <= {p.name for p in out.iterdir()}
    card = (out / "README.md").read_text()  # the model card: how to load it, what it was compressed from
    assert "import moecore" in card and f"base_model: {work / 'base'}" in card and "| experts: params |" in card
    with safe_open(str(out / "model.safetensors"), framework="pt") as fh:  # the load guards (test_hf_integration)
        assert LOAD_NOTICE_KEY in fh.keys() and "model.layers.0.mlp.experts.down_proj" in fh.keys()
    model = AutoModelForCausalLM.from_pretrained(out)
    st = moecore.statistics(model)
    assert 0.4 < st["total_compression_ratio"] <= 0.5
    assert st["layers"][0]["projections"]["gate"]["output_rel_error"] is not None  # calibration was used

    rc, stdout, _ = run_cli(capsys, "stats", out)
    assert rc == 0 and f"{st['total_params_compressed']:,}" in stdout
    rc, stdout, _ = run_cli(capsys, "stats", out, "--recompute", "--json")
    recounted = json.loads(stdout)  # on the meta device, from config and headers: every figure of the loaded model's
    assert rc == 0 and "meta device, no weights read" in recounted.pop("notes")
    assert recounted == json.loads(json.dumps({k: v for k, v in st.items() if k != "notes"}, default=str))

    rc, stdout, _ = run_cli(capsys, "export", out, "-o", work / "dense", "--device", "cpu")
    assert rc == 0
    dense = AutoModelForCausalLM.from_pretrained(work / "dense")
    assert "quantization_config" not in json.loads((work / "dense" / "config.json").read_text())
    ids = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(dense(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


def test_plan_prints_the_worked_example(capsys):
    rc, stdout, _ = run_cli(capsys, "plan", MIXTRAL, QWEN3, "--form", "wrapper", "--rank", "64", "--json")
    assert rc == 0
    plans = json.loads(stdout)
    assert plans[str(MIXTRAL)]["layers"][0]["params_compressed"] == 232_783_872
    assert plans[str(QWEN3)]["model"]["params_original"] == 30_532_122_624
    rc, stdout, _ = run_cli(capsys, "plan", MIXTRAL, "--form", "delta", "--rank", "128")
    assert rc == 0 and "7,449,083,904" in stdout and "54.0%" in stdout


def test_plan_and_stats_whole_model_multiply_adds(capsys, monkeypatch):
    """The whole-model multiply-adds of one token (issue 18: they once counted every stored
    expert weight as well): Qwen3-30B-A3B 3.04B -> 1.89B at the default 25%, tiny-mixtral 4.2M."""
    monkeypatch.setenv("COLUMNS", "200")
    rc, stdout, _ = run_cli(capsys, "plan", MIXTRAL, QWEN3)
    assert rc == 0 and "3,041,656,832" in stdout and "1,894,154,240" in stdout and "62.3%" in stdout
    assert "12,748,587,008" in stdout and "8,519,942,144" in stdout  # Mixtral-8x7B
    assert "model MACs" in stdout  # the summary's whole-model column
    rc, stdout, _ = run_cli(capsys, "stats", ROOT / "models" / "tiny-mixtral")
    assert rc == 0 and "model: multiply-adds / token" in stdout and "4,202,496" in stdout


@pytest.mark.parametrize("argv,command,match", [
    (["compress", "{w}/missing", "-o", "{w}/o1"], "compress", "not found"),
    (["compress", "{w}/base", "-o", "{w}/o2", "--rank", "0"], "compress", "rank must be > 0"),
    (["compress", "{w}/base", "-o", "{w}/o3", "--target-ratio", "1.5"], "compress", "target_ratio must be in (0, 1)"),
    (["compress", "{w}/base", "-o", "{w}/o4", "--rank", "10000"], "compress", "larger than min(d_in, d_out)"),
    (["compress", "{w}/base", "-o", "{w}/o5", "--calib", "{w}/empty.txt"], "compress", "holds no text"),
    (["compress", "{w}/base", "-o", "{w}/o6", "--calib", "{w}/nofile.txt"], "compress", "no such file"),
    (["compress", "{w}/base", "-o", "{w}/o6", "--calib", "{w}/llama"], "compress", "llama is a directory, not a text"),
    (["compress", "{w}/base", "-o", "{w}/o6", "--calib", "/dev/zero"], "compress", "/dev/zero is not a regular file"),
    (["compress", "{w}/llama", "-o", "{w}/o7", "--rank", "2"], "compress", "not a Mixture-of-Experts"),
    (["compress", "{w}/base", "-o", "{w}/base", "--rank", "2", "--overwrite"], "compress", "is the input"),
    (["compress", "{w}/base", "-o", "{w}/base/../base/", "--rank", "2", "--overwrite"], "compress", "is the input"),
    (["compress", "{w}/base", "-o", "{w}/base/sub", "--rank", "2"], "compress", "lies inside the input"),
    (["compress", "{w}/base", "-o", "{w}", "--rank", "2", "--overwrite"], "compress", "contains the input"),
    (["compress", "{w}/base", "-o", "{w}/calib.txt", "--calib", "{w}/calib.txt", "--rank", "2", "--overwrite"],
     "compress", "is the input"),
    (["compress", "{w}/base", "-o", "{w}/o13", "--rank", "2"], "compress", "already exists"),
    (["compress", "{w}/base", "-o", "{w}/o8", "--target-ratio", "0.0001"], "compress", "unreachable"),
    (["stats", "{w}/missing"], "stats", "not found"),
    (["stats", "{w}/llama"], "stats", "not a Mixture-of-Experts"),
    (["plan", "{w}/missing.json", "--rank", "8"], "plan", "not found"),
    (["plan", "{w}/calib.txt"], "plan", "cannot read a transformers config"),
    (["plan", "{w}/llama/config.json"], "plan", "not a Mixture-of-Experts"),
    (["plan", str(MIXTRAL), "--rank", "-3"], "plan", "rank must be > 0"),
    (["export", "{w}/base", "-o", "{w}/o9"], "export", "no moecore-compressed experts"),
    (["export", "{w}/missing", "-o", "{w}/o10"], "export", "not found"),
    (["export", "{w}/base", "-o", "{w}/base", "--overwrite"], "export", "is the input"),
    (["eval", "{w}/base", "--max-tokens", "0"], "eval", "max_tokens must be > 0"),
    (["eval", "{w}/base", "--seq-len", "0"], "eval", "seq_len must be > 0"),
    (["eval", "{w}/base", "--text", "{w}/bad.jsonl"], "eval", "bad.jsonl:2: \"text\" is a int, not a string"),
    (["compress", "{w}/base", "-o", "{w}/o14", "--calib", "{w}/bad.jsonl"], "compress", "bad.jsonl:2:"),
    (["compress", "{w}/base", "-o", "{w}/calib.txt/sub", "--rank", "2"], "compress", "calib.txt is not a folder"),
    (["compress", "{w}/base", "-o", "{w}/o15", "--rank", "2", "--device", "gpu0"], "compress", "not a device"),
    (["compress", "{w}/base", "-o", "{w}/o15", "--expert-chunk", "0"], "compress", "expert_chunk must be > 0"),
    (["compress", "{w}/base", "-o", "{w}/o15", "--core-bits", "5"], "compress", "core_bits must be one of"),
    (["compress", "{w}/base", "-o", "{w}/o18", "--calib", "{w}/calib.txt", "--no-calib"], "compress",
     "--calib and --no-calib exclude each other"),
    (["plan", str(MIXTRAL), "--rank", "8", "--quant-method", "rtn"], "plan", "quant needs core_bits or factor_bits"),
    (["distill", "--teacher", "{w}/base", "-o", "{w}/o16", "--max-steps", "0"], "distill", "max_steps must be > 0"),
    (["recover", "--teacher", "{w}/base", "--student", "{w}/missing", "-o", "{w}/o17"], "recover", "not found"),
    (["recover", "--teacher", "{w}/base", "--student", "{w}/base", "-o", "{w}/o19", "--device", "gpu0"], "recover",
     "--device gpu0: not a device"),
    (["export", "{w}/base", "-o", "{w}/o20", "--device", "gpu0"], "export", "--device gpu0: not a device"),
])
def test_bad_inputs_exit_2_with_one_line(work, capsys, argv, command, match):
    if argv[0] == "compress" and "--calib" not in argv:
        argv = [*argv, "--no-calib"]  # calibration is not the point here (and would only slow it down)
    rc, _, err = run_cli(capsys, *(a.format(w=work) for a in argv))
    assert_one_line_error(rc, err, command, match)


def test_compress_calibrates_on_the_bundled_corpus_by_default(work, capsys):
    """Without --calib: the bundled calibration split, said in one stderr line; --no-calib: data-free."""
    out = work / "default-calib"
    rc, _, err = run_cli(capsys, "compress", work / "base", "-o", out, "--rank", "2", "--calib-tokens", "512",
                         "--refine-steps", "1", "--quiet")
    said = [ln for ln in err.splitlines() if "bundled" in ln]
    assert rc == 0 and len(said) == 1 and "--calib FILE" in said[0] and "--no-calib" in said[0], err
    assert "routed_tokens" in (out / "config.json").read_text()  # the activation-aware init ran
    rc, _, err = run_cli(capsys, "compress", work / "base", "-o", work / "no-calib", "--rank", "2", "--no-calib",
                         "--refine-steps", "1", "--quiet")
    assert rc == 0 and "bundled" not in err and "routed_tokens" not in (work / "no-calib" / "config.json").read_text()


def test_corrupt_checkpoint_and_existing_output(work, capsys):
    good = work / "c2"
    assert run_cli(capsys, "compress", "--no-calib", work / "base", "-o", good, "--rank", "2", "--quiet")[0] == 0
    assert run_cli(capsys, "export", good, "-o", work / "base")[0] == 2  # exists, no --overwrite
    bad = work / "corrupt"
    bad.mkdir()
    for f in good.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    raw = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(raw[: len(raw) // 3])
    for cmd in (["stats", bad, "--recompute"], ["export", bad, "-o", work / "o11"]):
        rc, _, err = run_cli(capsys, *cmd)
        assert_one_line_error(rc, err, cmd[0], "corrupt safetensors file")
    # --overwrite replaces an existing compressed output
    rc, _, _ = run_cli(capsys, "compress", "--no-calib", work / "base", "-o", good, "--rank", "3", "--overwrite", "--quiet")
    assert rc == 0 and moecore.CompressionConfig.load(good).rank == 3


def test_real_process_error_is_one_line(work):
    """Through the console entry point in a real process: exit 2, one stderr line."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("MOECORE_DEBUG", None)
    r = subprocess.run([sys.executable, "-c", "import sys; from moecore.cli import main; sys.exit(main())", "compress", str(work / "base"), "-o",
                        str(work / "o12"), "--target-ratio", "1.5"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["moecore compress: error: target_ratio must be in (0, 1) (a fraction "
                                             "of the original expert parameters), got 1.5"]


@pytest.mark.parametrize("exc", ["ValueError('a bug')", "OSError(5, 'a bug')", "KeyError('a bug')"])
def test_a_bug_in_a_command_shows_its_traceback(work, exc):
    """Only MoecoreError is a one-line user error: any other exception raised inside a command,
    even a ValueError or an OSError, is a bug and keeps its traceback (real process, exit 1)."""
    code = ("import sys; import moecore.cli.stats_cmd as c\n"
            f"def run(args): raise {exc}\n"
            "c.run = run\nfrom moecore.cli import main\nsys.exit(main(sys.argv[1:]))")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("MOECORE_DEBUG", None)
    r = subprocess.run([sys.executable, "-c", code, "stats", str(work / "base")], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "Traceback (most recent call last)" in r.stderr and "a bug" in r.stderr
    assert "moecore stats: error:" not in r.stderr


def test_a_rank_that_does_not_compress_is_refused_with_the_break_even(capsys):
    """tiny-mixtral at rank 200 would store 142.7% of its expert parameters: refused, naming the
    largest rank that is still smaller; --allow-larger overrides."""
    bundled = ROOT / "models" / "tiny-mixtral"
    rc, _, err = run_cli(capsys, "plan", bundled, "--rank", "200")
    assert rc == 2
    m = re.fullmatch(r"moecore plan: error: rank 200 stores (\d+\.\d)% of the original expert parameters .*"
                     r"not smaller than the original; ranks up to (\d+) are smaller \(break-even rank (\d+)\); "
                     r"pass allow_larger=True \(--allow-larger\) to compress anyway", err.strip())
    assert m, err
    assert m.group(1) == "142.7" and int(m.group(3)) == int(m.group(2)) + 1
    below, at = int(m.group(2)), int(m.group(3))
    ratio = {}
    for r in (below, at):
        rc, out, _ = run_cli(capsys, "plan", bundled, "--rank", r, "--allow-larger", "--json")
        assert rc == 0
        m = json.loads(out)[str(bundled)]["model"]
        ratio[r] = (m["params_compressed"] - m["non_expert_params"]) / (m["params_original"] - m["non_expert_params"])
    assert ratio[below] < 1.0 <= ratio[at]


def test_plan_refuses_absurd_configs_at_once(capsys, tmp_path):
    """A config with 200,000 layers is refused before anything is built (it took minutes and GBs)."""
    conf = json.loads(MIXTRAL.read_text())
    (tmp_path / "config.json").write_text(json.dumps({**conf, "num_hidden_layers": 200_000}))
    rc, _, err = run_cli(capsys, "plan", tmp_path / "config.json")
    assert rc == 2
    assert err.strip() == "moecore plan: error: the config has 200,000 decoder layers; plan builds at most 4,096"
