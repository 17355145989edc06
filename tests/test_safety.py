"""Data safety (issue 12), each fault injected for real: a real SIGKILL mid-write, a real
``RLIMIT_FSIZE`` full disk, real truncated files, a real dense checkpoint under an MoE config,
a real broken tokenizer, a real NaN teacher, a real 200 MB calibration file.  Every test
checks that nothing was lost (input bytes unchanged) and nothing wrong was written."""
from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import moecore
from moecore.cli import main
from moecore.data import TextFile, calibration_sequences, load_split, spread_sequences, token_stream
from moecore.errors import CheckpointError, DataError, TrainingError
from moecore.io_utils import publish_dir, recover_interrupted
from moecore.modeling import load_model

from ._tiny_models import python_cmd, save_tiny, subprocess_env, tiny_mixtral, tokenizer


def tree_hash(path: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``path`` (a file or a folder)."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(f.relative_to(path.parent)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def one_error_line(stderr: str, command: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith(f"moecore {command}: error: ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def copy_dir(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """A tiny Mixtral ``base``, its compressed ``comp`` and a calibration file."""
    root = tmp_path_factory.mktemp("safety")
    save_tiny(root / "base", hidden=32, layers=2, experts=4)
    assert main(["compress", "--no-calib", str(root / "base"), "-o", str(root / "comp"), "--rank", "2", "--form", "delta",
                 "--quiet"]) == 0
    (root / "calib.txt").write_text("\n\n".join(load_split("calib")[:3]))
    return root


# ------------------------------------------------------------------ 1. output vs input
def test_library_writers_refuse_the_source_folder(w, tmp_path):
    before = tree_hash(w / "comp")
    model, tok = load_model(w / "comp")
    (tmp_path / "link").symlink_to(w / "comp")
    for out in (w / "comp", tmp_path / "link", w / "comp" / "sub", w / "comp" / ".." / "comp"):
        with pytest.raises(CheckpointError, match="input"):
            moecore.save_compressed(model, out, tokenizer=tok, overwrite=True)
        with pytest.raises(CheckpointError, match="input"):
            moecore.export_dense(model, out, overwrite=True)
    assert tree_hash(w / "comp") == before and not leftovers(w / "comp")


def test_recover_and_distill_refuse_outputs_over_inputs(w, capsys):
    before = {d: tree_hash(w / d) for d in ("base", "comp")}
    cases = [["recover", "--teacher", w / "base", "--student", w / "comp", "-o", w / "comp", "--overwrite"],
             ["recover", "--teacher", w / "base", "--student", w / "comp", "-o", w / "base" / "rec"],
             ["recover", "--teacher", w / "base", "--student", w / "comp", "-o", w / "x", "--calib", w / "x" / "c.txt"],
             ["distill", "--teacher", w / "base", "--student", w / "comp", "-o", w / "base"],
             ["distill", "--teacher", w / "base", "--student", w / "comp", "-o", w]]
    (w / "x").mkdir()
    (w / "x" / "c.txt").write_text("calibration inside the output")
    for argv in cases:
        assert main([str(a) for a in argv]) == 2
        assert "input" in one_error_line(capsys.readouterr().err, argv[0])
    assert {d: tree_hash(w / d) for d in ("base", "comp")} == before
    assert (w / "x" / "c.txt").read_text() == "calibration inside the output"


def test_output_under_a_regular_file_is_one_line(w, tmp_path, capsys):
    (tmp_path / "afile").write_text("a regular file where a folder is needed")
    out = tmp_path / "afile" / "out"
    for argv in (["recover", "--teacher", w / "base", "--student", w / "comp", "-o", out, "--steps", "1"],
                 ["distill", "--teacher", w / "base", "--student", w / "comp", "-o", out, "--max-steps", "1",
                  "--block-size", "32", "--batch-size", "1"],
                 ["export", w / "comp", "-o", out]):
        assert main([str(a) for a in argv]) == 2
        line = one_error_line(capsys.readouterr().err, argv[0])
        assert f"cannot write {out}" in line and ("not a folder" in line or "Not a directory" in line), line
    assert (tmp_path / "afile").read_text().startswith("a regular file")


# ------------------------------------------------------------------ 7. recoverable replace
def test_sigkill_mid_write_keeps_the_old_output_and_next_run_cleans_up(w, tmp_path):
    """Kill a real `moecore export --overwrite` while it writes; the old OUT is intact, the
    half-written temp folder is removed (and reported) by the next run."""
    big = tmp_path / "big"
    model, tok = tiny_mixtral(hidden=256, layers=4, experts=8)
    moecore.save_compressed(moecore.compress(model, moecore.CompressionConfig(rank=2, refine_steps=0)), big,
                            tokenizer=tok)
    out = tmp_path / "dense"
    assert main(["export", str(w / "comp"), "-o", str(out)]) == 0  # the existing result to protect
    old, src = tree_hash(out), tree_hash(big)
    proc = subprocess.Popen(python_cmd("export", str(big), "-o", str(out), "--overwrite"), env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not any(
            p.name.startswith(".dense.tmp-") and any(p.iterdir()) for p in tmp_path.iterdir()):
        time.sleep(0.001)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert tree_hash(out) == old and tree_hash(big) == src  # nothing lost
    assert [n.split("-")[0] for n in leftovers(out)] == [".dense.tmp"]  # the interrupted write's folder
    r = subprocess.run(python_cmd("export", str(w / "comp"), "-o", str(out)), env=subprocess_env(),
                       capture_output=True, text=True, timeout=300)
    assert "already exists" in one_error_line(r.stderr, "export")  # OUT is still the old, whole result
    assert "an incomplete output left by an interrupted run" in r.stderr
    assert not leftovers(out) and tree_hash(out) == old


def test_interrupted_two_rename_replace_is_restored_and_live_writers_are_skipped(w, tmp_path, capsys):
    """The state a kill between the two renames of the fallback path leaves (OUT missing, the
    previous result in .OUT.old-<dead pid>-*): the next run restores OUT and says so."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "out"
    moved = copy_dir(w / "comp", tmp_path / f".out.old-{dead.pid}-0a1b2c3d")
    expected = {k.replace(moved.name, "out"): v for k, v in tree_hash(moved).items()}
    live = tmp_path / f".out.tmp-{os.getpid()}-deadbeef"  # a writer that is still running
    live.mkdir()
    assert main(["compress", "--no-calib", str(w / "base"), "-o", str(out), "--rank", "2"]) == 2
    err = capsys.readouterr().err
    assert f"restored {out} from {moved.name}" in err and "already exists" in one_error_line(err, "compress")
    assert tree_hash(out) == expected and leftovers(out) == [live.name]
    assert recover_interrupted(out) == [] and live.exists()


@pytest.mark.parametrize("exchange", [True, False])
def test_publish_dir_replaces_whole(tmp_path, monkeypatch, exchange):
    import moecore.io_utils as iu

    if not exchange:
        monkeypatch.setattr(iu, "_exchange", lambda a, b: False)
    out, tmp = tmp_path / "out", tmp_path / ".out.tmp-1-ab"
    out.mkdir()
    (out / "a").write_text("old")
    tmp.mkdir()
    (tmp / "b").write_text("new")
    with pytest.raises(CheckpointError, match="already exists"):
        publish_dir(tmp, out, overwrite=False)
    publish_dir(tmp, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "b").read_text() == "new"


def test_outputs_follow_the_umask(w, tmp_path):
    old = os.umask(0o027)
    try:
        model, tok = load_model(w / "comp")
        out = moecore.save_compressed(model, tmp_path / "o", tokenizer=tok)
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o750
    assert {f.name: f.stat().st_mode & 0o777 for f in out.iterdir()} == {f.name: 0o640 for f in out.iterdir()}


# ------------------------------------------------------------------ 8. full disk
def test_full_disk_is_one_line_and_keeps_the_previous_output(w, tmp_path):
    out = tmp_path / "out"
    assert main(["compress", "--no-calib", str(w / "base"), "-o", str(out), "--rank", "3", "--quiet"]) == 0
    old, src = tree_hash(out), tree_hash(w / "base")

    def limit():  # a real file-size limit: writes past 200 kB fail with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    r = subprocess.run(python_cmd("compress", "--no-calib", str(w / "base"), "-o", str(out), "--rank", "2", "--overwrite"),
                       env=subprocess_env(), capture_output=True, text=True, timeout=300, preexec_fn=limit)
    assert r.returncode == 2
    line = one_error_line(r.stderr, "compress")
    assert f"cannot write {out}" in line and "no space left" in line, line
    assert tree_hash(out) == old and tree_hash(w / "base") == src
    left = leftovers(out)  # streaming keeps the layers it finished, and says how to go on
    assert left == [] or (left == [".out.partial"] and "--resume" in line), (left, line)
    if left:  # with space again, --resume completes the job and leaves nothing behind
        assert main(["compress", "--no-calib", str(w / "base"), "-o", str(out), "--rank", "2", "--overwrite", "--resume",
                     "--quiet"]) == 0
        assert not leftovers(out) and tree_hash(out) != old


# ------------------------------------------------------------------ 4. missing / corrupt tensors
def test_truncated_safetensors_and_dense_weights_under_moe_config(w, tmp_path, capsys):
    cut = copy_dir(w / "comp", tmp_path / "cut")
    raw = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(raw[:-100])  # a real truncated download
    for argv in (["eval", cut, "--max-tokens", "64"], ["stats", cut, "--recompute"], ["export", cut, "-o", tmp_path / "e"]):
        assert main([str(a) for a in argv]) == 2
        assert "corrupt safetensors file" in one_error_line(capsys.readouterr().err, argv[0])
    # an MoE config.json next to DENSE weights: transformers would randomly initialise the experts
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tokenizer()
    dense = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    mixed = copy_dir(w / "base", tmp_path / "mixed")
    dense.save_pretrained(tmp_path / "dense")
    (mixed / "model.safetensors").write_bytes((tmp_path / "dense" / "model.safetensors").read_bytes())
    src = tree_hash(mixed)
    assert main(["compress", "--no-calib", str(mixed), "-o", str(tmp_path / "o"), "--rank", "2"]) == 2
    line = one_error_line(capsys.readouterr().err, "compress")
    assert ("lacks" in line or "no tensor for" in line) and "mlp." in line, line  # streamed: the first missing one
    assert not (tmp_path / "o").exists() and tree_hash(mixed) == src


# ------------------------------------------------------------------ 2. tokenizer
def test_missing_or_empty_tokenizer_is_an_error_naming_the_folder(w, tmp_path, capsys):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    broken = copy_dir(w / "base", tmp_path / "broken")
    (broken / "tokenizer.json").unlink()  # tokenizer_config.json stays: AutoTokenizer can't build it
    assert main(["compress", str(broken), "-o", str(tmp_path / "o"), "--calib", str(w / "calib.txt"), "--rank", "2"]) == 2
    assert f"no usable tokenizer in {broken}" in one_error_line(capsys.readouterr().err, "compress")
    empty = copy_dir(w / "base", tmp_path / "empty")
    for f in empty.glob("*token*"):
        f.unlink()
    one = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"</s>": 0}, unk_token="</s>")), eos_token="</s>")
    one.save_pretrained(empty)
    assert main(["eval", str(empty), "--max-tokens", "64"]) == 2
    assert f"the tokenizer in {empty} is empty (1 token)" in one_error_line(capsys.readouterr().err, "eval")
    assert not (tmp_path / "o").exists()


def test_degenerate_token_stream_is_refused():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(WordLevel({"<unk>": 0, "</s>": 1, "the": 2}, unk_token="<unk>"))
    t.pre_tokenizer = Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, eos_token="</s>", unk_token="<unk>")
    with pytest.raises(DataError, match="unknown tokens"):
        calibration_sequences(load_split("calib")[:2], tok, 4096, 128)
    model, _ = tiny_mixtral(hidden=32)
    with pytest.raises(DataError, match="unknown tokens"):
        from moecore.evaluation import perplexity

        perplexity(model, tok, load_split("calib")[:1])


# ------------------------------------------------------------------ 5. teacher checks
@pytest.fixture(scope="module")
def nan_teacher(w, tmp_path_factory):
    d = copy_dir(w / "base", tmp_path_factory.mktemp("nan") / "teacher")
    sd = load_file(str(d / "model.safetensors"))
    sd["model.layers.0.block_sparse_moe.experts.1.w1.weight"][:3] = float("nan")  # original Mixtral names
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


def test_nan_teacher_stops_recover_and_distill_before_writing(w, nan_teacher, tmp_path, capsys):
    src = {d: tree_hash(d) for d in (nan_teacher, w / "comp")}
    assert main(["recover", "--teacher", str(nan_teacher), "--student", str(w / "comp"), "-o", str(tmp_path / "r"),
                 "--steps", "2", "--max-tokens", "512", "--seq-len", "128"]) == 2
    line = one_error_line(capsys.readouterr().err, "recover")
    assert "NaN or infinite" in line and "model.layers.0.mlp.experts.gate_up_proj" in line, line
    assert main(["distill", "--teacher", str(nan_teacher), "--student", str(w / "comp"), "-o", str(tmp_path / "d"),
                 "--max-steps", "2", "--block-size", "32", "--batch-size", "2"]) == 2
    assert "logits on a probe batch" in one_error_line(capsys.readouterr().err, "distill")
    assert not (tmp_path / "r").exists() and not (tmp_path / "d" / "final").exists()
    assert {d: tree_hash(d) for d in src} == src


def test_non_finite_loss_and_mismatched_teacher_stop_training(w, tmp_path):
    from moecore.training import distill
    from moecore.training.config import DistillConfig

    student = copy_dir(w / "comp", tmp_path / "student")
    sd = load_file(str(student / "model.safetensors"))
    sd["model.layers.1.mlp.experts.delta_a_up"][0] = float("inf")
    save_file(sd, str(student / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.experts\.delta_a_up holds NaN or infinite"):
        distill(str(w / "base"), str(student), tmp_path / "run", DistillConfig(max_steps=2, block_size=32, batch_size=2))
    sd["model.layers.1.mlp.experts.delta_a_up"][0] = 3e38  # finite when stored, overflows in the forward
    save_file(sd, str(student / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(TrainingError, match="non-finite loss .* at step 1"):
        distill(str(w / "base"), str(student), tmp_path / "run", DistillConfig(max_steps=2, block_size=32, batch_size=2))
    assert not (tmp_path / "run" / "final").exists() and not list((tmp_path / "run").glob("checkpoint-*"))
    other = save_tiny(tmp_path / "other", hidden=32, layers=2, experts=8)
    with pytest.raises(TrainingError, match=r"\(experts, intermediate, hidden\) = \(8, 64, 32\), the student \(4"):
        distill(str(other), str(w / "comp"), tmp_path / "run2", DistillConfig(max_steps=2, block_size=32, batch_size=2))
    assert not (tmp_path / "run2" / "final").exists()


# ------------------------------------------------------------------ 6. bounded calibration
def test_small_calibration_keeps_the_exact_recorded_behaviour():
    tok, texts = tokenizer(), load_split("calib")
    ref = spread_sequences(token_stream(tok, texts), 32768, 512)
    got = calibration_sequences(texts, tok, 32768, 512)
    assert len(got) == len(ref) and all(torch.equal(a, b) for a, b in zip(got, ref))


def test_text_file_streams_like_whole_file_parsing(tmp_path, monkeypatch):
    import lzma

    raw = "a\n\n\nb c\n \n\nd\n\n\n\n  e  \n\nf"
    (tmp_path / "t.txt").write_text(raw)
    monkeypatch.setattr(TextFile, "CHUNK", 3)  # documents and separators cut across chunks
    assert list(TextFile(tmp_path / "t.txt")) == [t.strip() for t in raw.split("\n\n") if t.strip()]
    monkeypatch.setattr(TextFile, "PIECE", 10)  # a long document comes in pieces cut at whitespace
    (tmp_path / "long.txt").write_text("aaaa bbbb cccc\ndddd eeee\n\nf")
    assert list(TextFile(tmp_path / "long.txt")) == ["aaaa bbbb", "cccc", "dddd eeee", "f"]
    with lzma.open(tmp_path / "t.jsonl.xz", "wt") as f:
        f.write('{"text": "one"}\n\n{"text": " "}\n{"text": "two"}\n{"id": 3}\n')
    with pytest.raises(DataError, match=r"t.jsonl.xz:5: no \"text\" field"):
        list(TextFile(tmp_path / "t.jsonl.xz"))
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(DataError, match="bin.txt: cannot read it as UTF-8"):
        list(TextFile(tmp_path / "bin.txt"))


CHILD = r"""
import json, resource, sys, time
from transformers import AutoTokenizer
from moecore.data import TextFile, calibration_sequences
tok = AutoTokenizer.from_pretrained(sys.argv[2])
calibration_sequences(["warm up the tokenizer"], tok, 64, 16)
r0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.time()
seqs = calibration_sequences(TextFile(sys.argv[1]), tok, 32768, 512)
print(json.dumps({"rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - r0, "s": time.time() - t0,
                  "lens": [len(s) for s in seqs], "text": tok.decode(seqs[0]) + tok.decode(seqs[-1])}))
"""


def test_200mb_calibration_file_uses_bounded_memory_and_covers_head_and_tail(tmp_path):
    """The issue's case: a 20 MB file took 4.2 GB, 200 MB crashed; and four documents of 50 MB
    each (no blank line inside) took +190 MB. Head is Bible, tail is Python docs."""
    texts = load_split("calib")
    kjv = next(t for t in texts if " unto " in t)[:4000]
    py = next(t for t in texts if "Python" in t and " unto " not in t)[:4000]
    p = tmp_path / "big.txt"
    quarter = 50 * 2 ** 20
    with open(p, "w", encoding="utf-8") as f:
        for i, doc in enumerate((kjv, py, kjv, py)):
            block = (doc + "\n") * (2 ** 20 // (len(doc) + 1) + 1)  # one long document: single newlines
            while f.tell() < (i + 1) * quarter:
                f.write(block)
            f.write("\n\n")
    assert p.stat().st_size >= 200 * 2 ** 20
    r = subprocess.run([sys.executable, "-c", CHILD, str(p), str(Path(__file__).parents[1] / "data" / "tokenizer")],
                       env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["lens"] == [512] * 64  # 32768 tokens in 64 full sequences
    assert res["rss_kb"] < 32 * 1024, res["rss_kb"]  # < 32 MB growth for a 200 MB file (49 MB before long documents came in pieces)
    assert res["s"] < 60, res["s"]
    assert " unto " in res["text"] and "Python" in res["text"]  # first sequence from the head, last from the tail


# ------------------------------------------------------------------ 8. the CLI's catch-all
def test_programming_errors_keep_their_traceback(monkeypatch, w):
    import moecore.cli.stats_cmd as stats_cmd

    def bug(args):
        raise TypeError("a bug, not a user error")

    monkeypatch.setattr(stats_cmd, "run", bug)
    with pytest.raises(TypeError, match="a bug"):
        main(["stats", str(w / "comp")])


# ------------------------------------------------------------------ guarantees: determinism, no code on load
def test_compression_is_byte_for_byte_deterministic(w, tmp_path):
    outs = []
    for i in range(2):
        model, tok = load_model(w / "base")
        model = moecore.compress(model, moecore.CompressionConfig(rank=2, refine_steps=2),
                                 calibration=TextFile(w / "calib.txt"), tokenizer=tok)
        outs.append(moecore.save_compressed(model, tmp_path / f"o{i}", tokenizer=tok))
    a, b = (tree_hash(o) for o in outs)
    assert [v for k, v in sorted(a.items())] == [v for k, v in sorted(b.items())]


def test_no_code_from_a_checkpoint_runs_on_load(w, tmp_path, capsys):
    evil = copy_dir(w / "comp", tmp_path / "evil")
    marker = tmp_path / "ran"
    (evil / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\n")
    cfg = json.loads((evil / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.Cfg", "AutoModelForCausalLM": "evil.Model"}
    (evil / "config.json").write_text(json.dumps(cfg))

    class Boom:  # a pickle that would run code if anything unpickled it
        def __reduce__(self):
            return (open, (str(marker), "w"))

    import pickle

    (evil / "pytorch_model.bin").write_bytes(pickle.dumps(Boom()))
    rc = main(["eval", str(evil), "--max-tokens", "64"])  # loads the built-in class from the safetensors
    capsys.readouterr()
    assert rc == 0 and not marker.exists()


def test_an_input_named_like_a_work_folder_is_never_removed(tmp_path):
    """Issue 20: ``cp -r src .x.partial; moecore compress .x.partial -o x --overwrite`` must not
    delete its own input (the work folder of ``x`` is ``.x.partial``): every removal goes through
    ``io_utils.remove_tree``, which refuses an input of the run; the input is intact after."""
    from moecore.cli import main
    from tests._tiny_models import save_tiny

    src = save_tiny(tmp_path / ".x.partial")
    before = {p.name: p.read_bytes() for p in src.iterdir() if p.is_file()}
    rc = main(["compress", str(src), "-o", str(tmp_path / "x"), "--rank", "4", "--no-calib", "--overwrite", "--quiet"])
    assert rc == 2
    assert {p.name: p.read_bytes() for p in src.iterdir() if p.is_file()} == before
    assert not (tmp_path / "x").exists()
