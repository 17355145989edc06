"""The streaming layer engine (``moecore compress DIR``, :func:`moecore.compress_checkpoint`):
streamed == in memory, kill + resume is byte-identical, host memory does not grow with depth,
bad checkpoints give one clear error and leave nothing behind."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralConfig

import moecore
from moecore.api import compress_checkpoint
from moecore.data import load_split
from moecore.errors import CheckpointError, UnsupportedModelError

from ._tiny_models import ROOT, python_cmd, subprocess_env, tokenizer

FAST = dict(target_ratio=0.25, refine_steps=1, calib_max_tokens=2048, calib_seq_len=256, recover_steps=5)


def _tree(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _logits(path, ids):
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return m(ids).logits


@pytest.mark.parametrize("name", ["tiny-mixtral", "tiny-qwen3moe"])
def test_streamed_equals_in_memory_on_a_resharded_bundled_model(tmp_path, name):
    src = AutoModelForCausalLM.from_pretrained(ROOT / "models" / name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(ROOT / "models" / name)
    sharded = tmp_path / "sharded"
    src.save_pretrained(sharded, max_shard_size="8MB")
    tok.save_pretrained(sharded)
    assert len(list(sharded.glob("*.safetensors"))) >= 3
    texts = load_split("calib")[:8]
    cfg = moecore.CompressionConfig(**FAST)
    shard = 1 if name == "tiny-mixtral" else "5GB"  # sharded output (one shard per layer) / one file
    res = compress_checkpoint(sharded, tmp_path / "streamed", cfg, texts, progress=False, max_shard_size=shard)
    assert [t["layer"] for t in res["timings"]] == list(range(src.config.num_hidden_layers))
    out = tmp_path / "streamed"
    if shard == 1:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) == src.config.num_hidden_layers + 1  # a shard per layer + rest
    else:
        assert [p.name for p in out.glob("*.safetensors")] == ["model.safetensors"]
    moecore.compress(src, cfg, texts, tok, progress=False)
    moecore.save_compressed(src, tmp_path / "memory", tokenizer=tok)
    ids = torch.randint(0, len(tok), (2, 48), generator=torch.Generator().manual_seed(0))
    assert torch.equal(_logits(out, ids), _logits(tmp_path / "memory", ids))
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no work folder left
    umask = os.umask(0)
    os.umask(umask)
    assert {oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {oct(0o666 & ~umask)}  # files follow the umask


def _tiny_checkpoint(path: Path, layers: int, hidden: int = 64, inter: int = 128, experts: int = 4, seed: int = 0):
    tok = tokenizer()
    cfg = MixtralConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=experts, num_experts_per_tok=2,
                        max_position_embeddings=512, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(path, max_shard_size="200KB" if hidden <= 64 else "20MB")
    tok.save_pretrained(path)
    return path


def _calib_file(path: Path) -> Path:
    path.write_text("\n\n".join(load_split("calib")[:4]), encoding="utf-8")
    return path


def _cli(*args, threads=1):
    return python_cmd("compress", *args, "--device", "cpu", "--quiet")


def test_kill_and_resume_is_byte_identical(tmp_path):
    src = _tiny_checkpoint(tmp_path / "src", layers=6)
    calib = _calib_file(tmp_path / "calib.txt")
    common = [str(src), "--calib", str(calib), "--rank", "8", "--refine-steps", "2", "--calib-tokens", "1024",
              "--recover-steps", "3"]
    env = subprocess_env(1)
    ref = subprocess.run(_cli(*common, "-o", str(tmp_path / "ref")), env=env, capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "out"
    work = tmp_path / ".out.partial"
    proc = subprocess.Popen(_cli(*common, "-o", str(out)), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill once at least 2 layers are committed, before the end
        try:
            if json.loads((work / "moecore_resume.json").read_text()).get("done", 0) >= 2:
                break
        except (OSError, ValueError):
            pass
        assert proc.poll() is None, "the run finished before it could be killed"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists() and work.is_dir()  # nothing looks complete
    assert not (work / "config.json").exists()
    again = subprocess.run(_cli(*common, "-o", str(out)), env=env, capture_output=True, text=True)
    assert again.returncode == 2 and "--resume" in again.stderr  # never restarts silently
    resumed = subprocess.run(_cli(*common, "-o", str(out), "--resume"), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    assert _tree(out) == _tree(tmp_path / "ref")
    assert not work.exists()
    # a resume into a different job (other rank) is refused
    proc = subprocess.Popen(_cli(*common, "-o", str(tmp_path / "o2")), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    while not (tmp_path / ".o2.partial" / "moecore_resume.json").exists() and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    other = [a if a != "8" else "4" for a in common]
    bad = subprocess.run(_cli(*other, "-o", str(tmp_path / "o2"), "--resume"), env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "different job" in bad.stderr


def test_host_memory_does_not_grow_with_depth(tmp_path):
    """16 layers streamed: what stays resident after each layer (weights, Grams and calibration
    state released) does not grow from layer to layer.  (Peak RSS of whole runs, 4 against 16
    layers, is measured in benchmarks/RESULTS.md §7: it also moves with allocator noise.)"""
    calib = _calib_file(tmp_path / "calib.txt")
    src = _tiny_checkpoint(tmp_path / "src", layers=16, hidden=256, inter=1024, experts=8)
    cfg = moecore.CompressionConfig(rank=16, refine_steps=0, svd="randomized", calib_max_tokens=512, calib_seq_len=128,
                                    recover_steps=2)
    res = compress_checkpoint(src, tmp_path / "out", cfg, moecore.data.TextFile(calib), progress=False)
    rss = [t["resident_bytes"] for t in res["timings"]]
    layer_bytes = 8 * 3 * 256 * 1024 * 4  # one layer's expert weights, float32 (24 MiB)
    grown = max(rss[4:]) - rss[3]
    assert grown < 2 * layer_bytes, f"resident memory grew by {grown / 2**20:.1f} MiB over 12 layers"


def test_bad_checkpoints_give_one_error_and_leave_nothing(tmp_path):
    src = _tiny_checkpoint(tmp_path / "src", layers=3)
    cfg = moecore.CompressionConfig(rank=4, refine_steps=0)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    # 1. a layer's tensor is missing from the index
    broken = tmp_path / "missing"
    broken.mkdir()
    for f in src.iterdir():
        (broken / f.name).symlink_to(f)
    (broken / "model.safetensors.index.json").unlink()
    gone = next(k for k in index["weight_map"] if ".layers.2." in k and "experts" in k)
    wm = {k: v for k, v in index["weight_map"].items() if k != gone}
    (broken / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    with pytest.raises(CheckpointError, match="missing pieces"):
        compress_checkpoint(broken, tmp_path / "o1", cfg, progress=False)
    # 2. a truncated shard
    trunc = tmp_path / "trunc"
    trunc.mkdir()
    for f in src.iterdir():
        (trunc / f.name).write_bytes(f.read_bytes())
    shard = sorted(trunc.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="safetensors"):
        compress_checkpoint(trunc, tmp_path / "o2", cfg, progress=False)
    # 3. quantized weights are refused with what to do
    q = tmp_path / "quant"
    q.mkdir()
    for f in src.iterdir():
        (q / f.name).symlink_to(f)
    (q / "config.json").unlink()
    conf = json.loads((src / "config.json").read_text())
    conf["quantization_config"] = {"quant_method": "mxfp4"}
    (q / "config.json").write_text(json.dumps(conf))
    with pytest.raises(UnsupportedModelError, match="dequantize"):
        compress_checkpoint(q, tmp_path / "o3", cfg, progress=False)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["missing", "quant", "src", "trunc"], left  # no output, no work folder


def test_more_experts_per_token_than_experts_is_refused():
    from moecore.errors import ConfigError

    tok = tokenizer()
    cfg = MixtralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=5)
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(ConfigError, match="num_experts_per_tok > number of experts"):
        moecore.compress(model, moecore.CompressionConfig(rank=2), progress=False)


@pytest.mark.parametrize("weight_map,match", [
    (["model.safetensors"], "weight_map must map tensor names to shard file names"),
    ({"x": 3}, "weight_map must map tensor names to shard file names"),
    ({"x": "../outside.safetensors"}, r"names the shard '\.\./outside\.safetensors' for x, outside the model folder"),
    ({"x": "/etc/passwd"}, r"names the shard '/etc/passwd' for x, outside the model folder"),
])
def test_malformed_index_is_one_checkpoint_error(tmp_path, weight_map, match):
    """An index whose weight_map is not a name -> shard map, or names a shard outside the
    model folder, is refused before anything is read or written."""
    src = _tiny_checkpoint(tmp_path / "src", layers=2)
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=match):
        compress_checkpoint(src, tmp_path / "o", moecore.CompressionConfig(rank=4, refine_steps=0), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
