"""The streaming layer engine (``moecore compress DIR``, :func:`moecore.compress_checkpoint`):
streamed == in memory, kill + resume is byte-identical, host memory does not grow with depth,
bad checkpoints give one clear error and leave nothing behind."""
from __future__ import annotations

import hashlib
import json
import os
import re
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
from moecore.cli import main
from moecore.data import load_split
from moecore.errors import CheckpointError, ConfigError, UnsupportedModelError
from moecore.families import is_compressed

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


def _tiny_checkpoint(path: Path, layers: int, hidden: int = 64, inter: int = 128, experts: int = 4, seed: int = 0,
                     dtype: torch.dtype = torch.float32):
    tok = tokenizer()
    cfg = MixtralConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=experts, num_experts_per_tok=2,
                        max_position_embeddings=512, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).to(dtype)
    model.save_pretrained(path, max_shard_size="200KB" if hidden <= 64 else "20MB")
    tok.save_pretrained(path)
    return path


def _calib_file(path: Path) -> Path:
    path.write_text("\n\n".join(load_split("calib")[:4]), encoding="utf-8")
    return path


def _cli(*args, threads=1):
    return python_cmd("compress", *args, "--device", "cpu", "--quiet")


def _flip_signs(folder: Path, part: str) -> None:
    """Negate, in place, the first expert tensor of ``folder``'s shards whose name holds
    ``part``: the file keeps its names, sizes and header; only the data changes."""
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "r+b") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
            name = next((k for k in sorted(header) if part in k and "experts" in k), None)
            if name is None:
                continue
            assert header[name]["dtype"] == "F32"
            begin, end = header[name]["data_offsets"]
            fh.seek(8 + n + begin)
            data = bytearray(fh.read(end - begin))
            data[3::4] = bytes(b ^ 0x80 for b in data[3::4])  # the sign bit of every little-endian float32
            fh.seek(8 + n + begin)
            fh.write(data)
            return
    raise AssertionError(f"no expert tensor under {part}")


def _killed_once_it_has_state(common: list[str], out: Path, env: dict) -> None:
    """``moecore compress COMMON -o OUT`` in a child, SIGKILLed once its work folder holds a state."""
    proc = subprocess.Popen(_cli(*common, "-o", str(out)), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    while not (out.parent / f".{out.name}.partial" / "moecore_resume.json").exists() and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def test_kill_and_resume_is_byte_identical(tmp_path, capsys):
    src = _tiny_checkpoint(tmp_path / "src", layers=4)
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
    assert main(["compress", *common, "-o", str(out), "--device", "cpu", "--quiet"]) == 2  # in-process: it
    assert "--resume" in capsys.readouterr().err  # fails before any compute; never restarts silently
    # weights edited in place (same names, sizes and headers) under a finished layer: refused, kept
    state = (work / "moecore_resume.json").read_bytes()
    _flip_signs(src, ".layers.0.")
    assert main(["compress", *common, "-o", str(out), "--resume", "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "weights of layer 0 changed" in err and err.count("error:") == 1 and "Traceback" not in err, err
    assert (work / "moecore_resume.json").read_bytes() == state
    _flip_signs(src, ".layers.0.")  # back as they were
    resumed = subprocess.run(_cli(*common, "-o", str(out), "--resume"), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    assert _tree(out) == _tree(tmp_path / "ref")
    assert not work.exists()
    # a resume into a different job (other rank) is refused
    _killed_once_it_has_state(common, tmp_path / "o2", env)
    other = [a if a != "8" else "4" for a in common]
    assert main(["compress", *other, "-o", str(tmp_path / "o2"), "--resume", "--device", "cpu", "--quiet"]) == 2
    assert "different job" in capsys.readouterr().err


def test_two_runs_on_one_output_the_second_fails_at_once(tmp_path, capsys):
    """A live run holds its work folder's OS lock: a second run on the same output, even with
    --overwrite, fails at once with one line and touches nothing; the first publishes its
    own complete model.  The lock dies with its process: a killed run never blocks a rerun."""
    src = _tiny_checkpoint(tmp_path / "src", layers=4)
    calib = _calib_file(tmp_path / "calib.txt")
    common = [str(src), "--calib", str(calib), "--rank", "8", "--refine-steps", "2", "--calib-tokens", "1024"]
    env = subprocess_env(1)
    out, work = tmp_path / "out", tmp_path / ".out.partial"
    first = subprocess.Popen(_cli(*common, "-o", str(out)), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while not (work / "moecore_resume.json").exists():
        assert first.poll() is None, "the first run ended before it wrote its state"
        time.sleep(0.02)
    for extra in ([], ["--overwrite"], ["--resume"]):
        assert main(["compress", *common, "-o", str(out), *extra, "--device", "cpu", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert "in use by another moecore run" in err and err.count("error:") == 1 and "Traceback" not in err, err
    assert first.poll() is None, "the first run ended before the second could be refused"
    assert first.wait(timeout=300) == 0, first.stderr.read()
    reloaded = AutoModelForCausalLM.from_pretrained(out)  # the first run's model, whole
    assert is_compressed(reloaded, recurse=True)
    assert not work.exists()
    # a killed run's lock is gone with it: the rerun with --overwrite starts over
    _killed_once_it_has_state(common, tmp_path / "o2", env)
    assert main(["compress", *common, "-o", str(tmp_path / "o2"), "--rank", "2", "--refine-steps", "0",
                 "--overwrite", "--device", "cpu", "--quiet"]) == 0


#: every fault point of the per-layer commit and of finish() (moecore.streaming.fault_point), in run order
KILL_POINTS = ("layer:shard", "layer:committed", "finish:rest", "finish:written", "finish:merged-file",
               "finish:merged", "finish:done", "published")


def _compress_killed_at(point: str, src: Path, out: Path, calib: Path) -> int:
    """``compress_checkpoint`` (this test's config) in a child process with ``MOECORE_KILL_AT=point``:
    its return code (``-SIGKILL`` when the fault point was reached)."""
    code = ("import sys, moecore; from moecore.api import compress_checkpoint; "
            "compress_checkpoint(sys.argv[1], sys.argv[2], moecore.CompressionConfig(**KILL_CFG), "
            "open(sys.argv[3], encoding='utf-8').read().split(chr(10) * 2), progress=False)"
            ).replace("KILL_CFG", repr(KILL_CFG))
    env = {**subprocess_env(1), "MOECORE_KILL_AT": point}
    return subprocess.run([sys.executable, "-c", code, str(src), str(out), str(calib)], env=env,
                          capture_output=True, timeout=300).returncode


KILL_CFG = {"rank": 4, "refine_steps": 0, "calib_max_tokens": 256}


@pytest.fixture
def one_thread():
    """One torch thread in this process, as the children have (``OMP_NUM_THREADS=1``): layers
    fitted here and there then round alike."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_kill_at_every_step_of_finish_resumes_to_the_same_bytes(tmp_path, one_thread):
    """Issue 20: a real SIGKILL at each step of the per-layer write and of finish() (the merge
    into one model.safetensors included) and just after publishing, then resume: the published model is byte-identical
    to an uninterrupted run's and never incomplete; a folder killed after finish() is published
    as it is; a layer shard changed in the work folder stops the resume, naming the file.
    (The kills in child processes, the resumes in this one.)"""
    src = _tiny_checkpoint(tmp_path / "src", layers=2)
    calib = _calib_file(tmp_path / "calib.txt")
    texts = calib.read_text(encoding="utf-8").split("\n\n")
    cfg = moecore.CompressionConfig(**KILL_CFG)
    compress_checkpoint(src, tmp_path / "ref", cfg, texts, progress=False)
    for point in KILL_POINTS:
        out = tmp_path / point.replace(":", "-")
        work = tmp_path / f".{out.name}.partial"
        assert _compress_killed_at(point, src, out, calib) == -signal.SIGKILL, point
        if point == "published":  # killed after publishing: complete, but the state file is left in it
            assert not work.exists() and (out / "moecore_resume.json").is_file()
        else:
            assert not out.exists() and work.is_dir(), point  # nothing looks complete
        if point == "finish:rest":  # a shard changed after it was written: the resume is refused, naming it
            shard = sorted(work.glob("model-00001-of-*.safetensors"))[0]
            good = shard.read_bytes()
            shard.write_bytes(good[:-8] + bytes(8))
            with pytest.raises(CheckpointError, match=f"{shard.name} changed since it was written"):
                compress_checkpoint(src, out, cfg, texts, progress=False, resume=True)
            shard.write_bytes(good)
        compress_checkpoint(src, out, cfg, texts, progress=False, resume=True)
        assert _tree(out) == _tree(tmp_path / "ref"), point
        assert not work.exists(), point


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


def _faults_of_reused_allocations() -> int:
    """Minor page faults of 64 allocations of 1 MiB each, written and freed in turn: about
    16,000 when every such block is its own mmap, a few when glibc's heap reuses them."""
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(64):
        torch.empty(1 << 18, dtype=torch.float32).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_the_engine_heap_bound_ends_with_the_compression(tmp_path):
    """The engine serves large blocks from mmap while it runs (bounded memory), but the user's
    process gets glibc's reuse back afterwards: a bound left behind made every later tensor
    allocation an mmap, and the held-out evaluation after a compression took twice the CPU."""
    for run in ("in-memory", "streamed"):
        if run == "in-memory":
            model = AutoModelForCausalLM.from_pretrained(_tiny_checkpoint(tmp_path / "mem", layers=2))
            moecore.compress(model, moecore.CompressionConfig(rank=4, refine_steps=0), progress=False)
        else:
            src = _tiny_checkpoint(tmp_path / "src", layers=2)
            compress_checkpoint(src, tmp_path / "out", moecore.CompressionConfig(rank=4, refine_steps=0), progress=False)
        after = _faults_of_reused_allocations()
        assert after < 1_000, (run, after)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_recovery_heap_serves_every_block_from_the_heap_then_gives_mmap_back():
    """Block recovery's Adam steps allocate temporaries of hundreds of MiB at real shapes, above
    the 32 MiB that glibc's mmap threshold can reach: inside ``reusable_heap`` no block is an
    mmap (M_MMAP_MAX 0), so freed blocks stay in the heap for reuse (the page faults this saves
    are measured by benchmarks/recovery_step.py); afterwards mmap is back.  Scopes nest: leaving
    the recovery scope inside the engine's ``bounded_host_heap`` restores the engine's bound.

    Measured with glibc's own count of mmapped bytes (``mallinfo2().hblkhd``) while a block
    larger than the whole heap lives: no free chunk can serve it, whatever ran before."""
    import ctypes

    from moecore import heap

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                    "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = Mallinfo2

    def mmapped_for_a_block_larger_than_the_heap() -> int:
        before = libc.mallinfo2()
        block = torch.empty((before.arena + (64 << 20)) // 4, dtype=torch.float32)  # untouched: no pages
        grown = libc.mallinfo2().hblkhd - before.hblkhd
        del block
        return grown

    released = dict(heap._SET)
    with heap.reusable_heap():
        assert heap._SET[heap.M_MMAP_MAX] == 0
        assert mmapped_for_a_block_larger_than_the_heap() == 0  # from the heap (sbrk), kept there
    assert heap._SET == released
    assert mmapped_for_a_block_larger_than_the_heap() >= 64 << 20  # its own mmap again
    with heap.bounded_host_heap():
        bound = dict(heap._SET)
        assert bound[heap.M_MMAP_THRESHOLD] == heap.HEAP_BOUND
        with heap.reusable_heap():
            assert mmapped_for_a_block_larger_than_the_heap() == 0
        assert heap._SET == bound  # the engine's bound, not the released state
    assert heap._SET == released


def test_compress_warns_when_the_estimate_exceeds_free_memory(tmp_path, monkeypatch, capsys):
    """A run the machine cannot hold is said before it starts, with plan's estimate (not after
    half an hour: a Mixtral-8x7B layer on a 24 GiB machine was killed in its fit)."""
    from moecore import planning
    from moecore.errors import MemoryWarning

    src = _tiny_checkpoint(tmp_path / "src", layers=1)
    cfg = moecore.CompressionConfig(rank=4, refine_steps=0)
    need = planning.plan(src, cfg)["memory_estimate"]["host_gib_cpu_only"]
    assert planning.memory_shortfall(src, cfg, torch.device("cpu"), None, available=1 << 40) is None
    monkeypatch.setattr(planning, "available_host_bytes", lambda: 1 << 20)
    with pytest.warns(MemoryWarning, match=f"{need:.1f} GiB of host memory, 0.0 GiB free"):
        compress_checkpoint(src, tmp_path / "out", cfg, progress=False)
    assert (tmp_path / "out" / "config.json").is_file()  # a warning, not a refusal
    from moecore.cli import main
    assert main(["compress", str(src), "-o", str(tmp_path / "cli"), "--rank", "4", "--refine-steps", "0",
                 "--no-calib", "--quiet"]) == 0
    assert f"moecore: warning: the largest layer (model.layers.0) is estimated to need {need:.1f} GiB" in \
        capsys.readouterr().err


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


def test_a_failed_run_with_no_finished_layer_leaves_no_work_folder(tmp_path):
    """A run refused after its work folder was made (a rank above min(d_in, d_out)) removes it,
    so the corrected rerun starts without --resume or --overwrite."""
    src = _tiny_checkpoint(tmp_path / "src", layers=2)
    with pytest.raises(ConfigError, match="larger than min"):
        compress_checkpoint(src, tmp_path / "xo", moecore.CompressionConfig(rank=10_000), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    compress_checkpoint(src, tmp_path / "xo", moecore.CompressionConfig(rank=4, refine_steps=0), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "xo"]


def _signals_as_in_a_shell() -> None:
    """``preexec_fn`` of a child that is sent SIGINT / SIGTERM: default dispositions, unblocked.
    A child inherits its parent's ignored signals and signal mask, and a test worker may carry
    either from an earlier test's library (the child then ran to its end and exited 0)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


def _interrupt_when(proc, work: Path, layers: int, sig: int) -> str:
    """Send ``sig`` to ``proc`` once ``work`` holds at least ``layers`` finished layers; its stderr."""
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if json.loads((work / "moecore_resume.json").read_text()).get("done", 0) >= layers:
                break
        except (OSError, ValueError):
            pass
        assert proc.poll() is None, "the run finished before it could be interrupted"
        time.sleep(0.02)
    os.kill(proc.pid, sig)
    return proc.communicate(timeout=120)[1]


def test_interrupt_says_what_is_kept_and_a_refused_resume_names_the_difference(tmp_path):
    """A real SIGINT, then a real SIGTERM: each prints "N of M layers kept in WORK; rerun the
    same command with --resume" (exit 130 / 143); a resume with another rank names the
    compression config's field that differs; the last resume finishes and prints next steps."""
    src = _tiny_checkpoint(tmp_path / "src", layers=6)
    calib = _calib_file(tmp_path / "calib.txt")
    common = [str(src), "--calib", str(calib), "--rank", "8", "--refine-steps", "2", "--calib-tokens", "1024",
              "--recover-steps", "0", "-o", str(tmp_path / "out")]  # (in-engine recovery is not the point)
    env, work = subprocess_env(1), tmp_path / ".out.partial"
    proc = subprocess.Popen(_cli(*common), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_signals_as_in_a_shell)
    err = _interrupt_when(proc, work, 2, signal.SIGINT)
    assert proc.returncode == 130, err
    done = json.loads((work / "moecore_resume.json").read_text())["done"]
    assert f"moecore: interrupted: {done} of 6 layers kept in {work}; rerun the same command with --resume" in err
    assert "Traceback" not in err
    other = [a if a != "8" else "4" for a in common]
    bad = subprocess.run(_cli(*other, "--resume"), env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "different job" in bad.stderr
    assert "the compression config (rank: 8 there, 4 here) differs" in bad.stderr
    proc = subprocess.Popen(_cli(*common, "--resume"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, preexec_fn=_signals_as_in_a_shell)
    err = _interrupt_when(proc, work, done + 1, signal.SIGTERM)
    assert proc.returncode == 143, err
    assert re.search(r"moecore: interrupted: [1-6] of 6 layers kept in .*; rerun the same command with --resume", err)
    last = subprocess.run(_cli(*common, "--resume"), env=env, capture_output=True, text=True)
    assert last.returncode == 0, last.stderr
    assert f"next: moecore eval {tmp_path / 'out'}" in last.stdout
    assert "AutoModelForCausalLM.from_pretrained(" in last.stdout


def test_a_half_precision_layer_not_recovered_is_fitted_into_its_own_dtype(tmp_path, monkeypatch):
    """On a CPU a bfloat16 layer is computed in float32; its compressed experts, neither trained
    nor run there when there is no recovery, are built in bfloat16 at once (half the bytes for
    the finished projections during the fit): the output is byte-identical to building them in
    float32 and casting them when the layer is restored."""
    import moecore.engine as engine

    src = _tiny_checkpoint(tmp_path / "src", layers=2, dtype=torch.bfloat16)
    texts = _calib_file(tmp_path / "calib.txt").read_text(encoding="utf-8").split("\n\n")
    real, asked = engine.fit_experts, []

    def spy(*a, **k):
        asked.append(k.get("store_dtype"))
        return real(*a, **k)

    def wide(*a, **k):
        return real(*a, **{**k, "store_dtype": None})

    for name, cfg in (("idle", moecore.CompressionConfig(rank=4, refine_steps=1, recover_steps=0)),
                      ("trained", moecore.CompressionConfig(rank=4, refine_steps=1, recover_steps=2))):
        monkeypatch.setattr(engine, "fit_experts", spy)
        compress_checkpoint(src, tmp_path / name, cfg, texts, progress=False, device="cpu")
        monkeypatch.setattr(engine, "fit_experts", wide)
        compress_checkpoint(src, tmp_path / f"{name}-wide", cfg, texts, progress=False, device="cpu")
        files = sorted(f.name for f in (tmp_path / name).glob("*.safetensors"))
        assert files and files == sorted(f.name for f in (tmp_path / f"{name}-wide").glob("*.safetensors"))
        assert all((tmp_path / name / f).read_bytes() == (tmp_path / f"{name}-wide" / f).read_bytes() for f in files)
    assert asked == [torch.bfloat16] * 2 + [None] * 2  # recovery trains the module in float32
