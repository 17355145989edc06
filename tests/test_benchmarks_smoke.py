"""Smoke tests of the benchmark scripts (``benchmarks/speed.py``, ``benchmarks/quality_per_byte.py``)
in ``--quick`` mode on tiny random models built from configs (no download), plus the
baselines' invariants: pruning keeps exactly the budgeted experts and the router never
picks a pruned one, merging leaves the budgeted number of distinct experts, and the RTN
byte count equals its formula.  The results JSON names the commit, versions and config that
produced it, and every reference row of ``make check-results`` names its command, commit,
value and tolerance."""
from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        yield {n: importlib.import_module(n) for n in ("speed", "quality_per_byte", "baselines", "check_results")}
    finally:
        sys.path.remove(str(BENCH))


def test_speed_quick(bench, tmp_path):
    bench["speed"].main(["--quick", "--threads", "1", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "speed_quick.json").read_text())
    assert (tmp_path / "speed_quick.png").stat().st_size > 0 and (tmp_path / "speed_quick.md").is_file()
    meta, blk = data["meta"], data["results"]["tiny"]
    assert meta["threads"] == 1 and meta["versions"]["torch"] == torch.__version__
    shape = blk["shape"]
    assert 0 < shape["param_ratio"]["delta"] <= 0.25 and 0 < shape["param_ratio"]["wrapper"] <= 0.25
    # delta MACs: cores once per token + k low-rank paths, from the budget maths
    h, f, e, k, s = shape["H"], shape["F"], shape["E"], shape["top_k"], shape["delta_rank_s"]
    assert shape["macs_ratio"]["delta"] == pytest.approx((3 * h * f + k * 3 * s * (h + f)) / (k * 3 * h * f))
    assert [r["tokens"] for r in blk["rows"]] == [1, 8, 64]
    for r in blk["rows"]:
        assert set(r["ms"]) == {"grouped_mm", "eager", "delta", "wrapper"}
        assert all(v > 0 for v in r["ms"].values())
        assert r["speedup_vs_grouped_mm"]["grouped_mm"] == 1.0
        assert r["delta_vs_grouped_mm_max_rel_err"] < 1e-4  # the original holds the delta's weights
        assert 0 < r["bytes_touched_ratio"]["delta"] < 1


def test_quality_per_byte_quick(bench, tmp_path):
    bench["quality_per_byte"].main(["--quick", "--threads", "1", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "quality_per_byte_quick.json").read_text())
    assert (tmp_path / "quality_per_byte_quick.png").stat().st_size > 0
    assert (tmp_path / "quality_per_byte_quick.md").read_text().startswith("| model |")
    rows = {(r["method"], r["level"]): r for r in data["rows"]}
    lines = (tmp_path / "quality_per_byte_quick.rows.jsonl").read_text().splitlines()
    measured = [r for r in data["rows"] if "skipped" not in r]
    assert len(lines) == len(measured) - 1  # every measured non-original row, written as it finished
    orig = rows[("original", 1.0)]
    assert orig["ppl_ratio"] == 1.0 and orig["expert_bytes_ratio"] == 1.0
    assert data["meta"]["protocol"]["max_tokens"] == 1024 and data["meta"]["calibration"]["split"] == "calib"
    for r in measured:
        assert r["ppl"] > 1 and r["tokens_scored"] == orig["tokens_scored"]
    for m in ("moecore-ragged", "moecore-delta", "moecore-wrapper", "delta-svd", "mobe"):
        for b in (0.5, 0.25):
            # the ragged form also stores one int32 rank per expert and projection (2 layers x 3 x 8 experts)
            index = 2 * 3 * 8 * 4 if m == "moecore-ragged" else 0
            assert 0 < rows[(m, b)]["expert_bytes"] - index <= b * orig["expert_bytes"]
    # MoBE as the paper runs it (down_proj dense) cannot reach 25%: recorded as skipped, not fatal
    assert 0.45 < rows[("mobe-paper", 0.5)]["expert_bytes_ratio"] <= 0.5
    assert "at least 1/3" in rows[("mobe-paper", 0.25)]["skipped"]
    # tiny-random: 2 layers x 8 experts; 50 % keeps exactly 4 experts per layer
    assert set(rows[("reap-prune", 0.5)]["kept_per_layer"].values()) == {4}
    assert rows[("reap-prune", 0.5)]["expert_bytes_ratio"] == 0.5
    assert set(rows[("hc-merge", 0.25)]["clusters_per_layer"].values()) == {2}
    # RTN 4-bit, group 64: 4-bit codes + bf16 scale + 4-bit zero per group
    n = orig["expert_bytes"] // 2
    assert rows[("rtn-4bit", 4)]["expert_bytes"] == (n * 4 + (n // 64) * (16 + 4)) // 8
    assert rows[("rtn-2bit", 2)]["expert_bytes"] == (n * 2 + (n // 64) * (16 + 2)) // 8
    # what produced the numbers: the code's commit, the versions and each moecore row's config
    prov = data["meta"]["provenance"]
    assert prov["versions"]["torch"] == torch.__version__ and prov["versions"]["transformers"]
    assert set(prov["git"]) >= {"commit", "dirty"} and prov["config"]["defaults"]["form"] == "ragged"
    assert rows[("moecore-q", "0.5:4/4")]["config"]["quant"]["core_bits"] == 4
    assert rows[("moecore-delta", 0.25)]["config"]["target_ratio"] == 0.25
    assert all("commit" in json.loads(line) for line in lines)


def test_pruned_router_never_picks_pruned_experts(bench):
    qpb, bl = bench["quality_per_byte"], bench["baselines"]
    model, tok = qpb.tiny_random_model()
    seqs = [torch.randint(0, len(tok), (64,)) for _ in range(2)]
    stats = bl.collect_expert_stats(model, seqs, mean_tokens=64)
    _, kept = bl.prune_experts(model, stats, 0.5)
    seen = {}

    def record(path):
        return lambda mod, args, kwargs: seen.setdefault(path, set()).update(args[1].unique().tolist())

    for path, mod, _ in bl.experts_of(model):
        mod.register_forward_pre_hook(record(path), with_kwargs=True)
    with torch.no_grad():
        model(input_ids=torch.stack(seqs))
    for path, ids in kept.items():
        assert len(ids) == 4 and seen[path] <= set(ids)


def test_merge_leaves_cluster_count_distinct_experts(bench):
    qpb, bl = bench["quality_per_byte"], bench["baselines"]
    model, tok = qpb.tiny_random_model()
    stats = bl.collect_expert_stats(model, [torch.randint(0, len(tok), (64,))], mean_tokens=64)
    _, labels = bl.merge_experts(model, stats, 0.25)
    for path, mod, _ in bl.experts_of(model):
        assert torch.unique(mod.down_proj.detach(), dim=0).shape[0] == 2 == len(set(labels[path]))


def test_mobe_error_falls_as_bases_are_added(bench):
    """MoBE's objective (arXiv 2508.05257, the authors' train.py): ``W_e ≈ A_e·act(softmax(α_e)·B)``
    fitted by Adam to the scaled weights. On a random layer whose 8 experts draw their rows from
    4 subspaces (2 experts each), the error falls as bases are added, to near zero at 4."""
    bl = bench["baselines"]
    g = torch.Generator().manual_seed(0)
    e, r, c, k = 8, 16, 32, 6
    subspaces = torch.randn(4, k, c, generator=g) / c ** 0.5  # (4, k, C)
    w = torch.randn(e, r, k, generator=g) @ subspaces.repeat_interleave(2, dim=0) + 0.01 * torch.randn(e, r, c, generator=g)
    errs = []
    for m in (1, 2, 4):
        fit = bl.fit_mobe(w, m, k, steps=400)
        assert fit["a"].shape == (e, r, k) and fit["bases"].shape == (m, k, c) and fit["logits"].shape == (e, m)
        rebuilt = bl.mobe_reconstruct(fit["a"], fit["bases"], fit["logits"], "silu") * w.std()
        torch.testing.assert_close(rebuilt, fit["w_hat"])
        assert fit["rel_err"] == pytest.approx(float((fit["w_hat"] - w).norm() / w.norm()), rel=1e-5)
        losses = [loss for _, loss in fit["history"]]
        assert losses[-1] < losses[0]  # Adam lowers the paper's scaled MSE
        errs.append(fit["rel_err"])
    assert errs[0] > 1.5 * errs[1] > 2.25 * errs[2] and errs[2] < 0.05, errs
    # the budget formula: A's, the bases' and the logits' parameters fit the budget, one more rank would not
    k25 = bl.mobe_rank(0.25, 32, 96, 256, 8)
    assert 32 * 96 * k25 + 8 * k25 * 256 + 32 * 8 <= 0.25 * 32 * 96 * 256 < 32 * 96 * (k25 + 1) + 8 * (k25 + 1) * 256 + 256


def test_recovery_step_smoke(tmp_path):
    sys.path.insert(0, str(BENCH))
    try:
        mod = importlib.import_module("recovery_step")
        mod.main(["--shape", "tiny", "--steps", "3", "--tokens", "64", "--batch-tokens", "16",
                  "--out", str(tmp_path / "r.json")])
    finally:
        sys.path.remove(str(BENCH))
    data = json.loads((tmp_path / "r.json").read_text())
    assert [r["variant"] for r in data["rows"]] == ["before", "heap", "padded", "fused"]
    assert all(r["first_2_steps_s"] > 0 for r in data["rows"]) and data["rows"][0]["vs_first"] == 1.0
    assert data["mean_rank"] < data["max_rank"] <= 2 * data["mean_rank"]  # ragged ranks, padding happens
    assert data["provenance"]["versions"]["torch"] == torch.__version__


def test_recovery_memory_smoke(tmp_path):
    """benchmarks/recovery_memory.py at a toy shape: all experts at once, then one at a time."""
    sys.path.insert(0, str(BENCH))
    try:
        mod = importlib.import_module("recovery_memory")
        whole = mod.main(["--shape", "tiny", "--steps", "3", "--tokens", "64", "--batch-tokens", "16"])
        chunked = mod.main(["--shape", "tiny", "--steps", "3", "--tokens", "64", "--batch-tokens", "16",
                            "--memory-gb", "1e-7",  # below one expert's trained tensors: one at a time
                            "--out", str(tmp_path / "r.json")])
    finally:
        sys.path.remove(str(BENCH))
    assert whole["experts_per_chunk"] == 8 and "expert_chunks" not in whole["report"]
    assert chunked["experts_per_chunk"] == 1 and chunked["report"]["expert_chunks"] == 8
    assert chunked["peak_anon_gib"] >= chunked["anon_before_gib"] > 0 and chunked["seconds"] > 0
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["provenance"]["versions"]["torch"] == torch.__version__


def test_svd_cost_smoke(tmp_path):
    """benchmarks/svd_cost.py at a toy shape: both SVDs timed, the same energy, orthonormal U."""
    sys.path.insert(0, str(BENCH))
    try:
        mod = importlib.import_module("svd_cost")
        mod.main(["--shapes", "tiny", "--repeats", "1", "--parts", "--out", str(tmp_path / "s.json")])
    finally:
        sys.path.remove(str(BENCH))
    data = json.loads((tmp_path / "s.json").read_text())
    row = data["rows"][0]
    for start in ("cold", "warm"):
        assert row[start]["reference_s"] > 0 and row[start]["new_s"] > 0
        assert abs(row[start]["energy_rel_diff"]) < 1e-5 and row[start]["orthogonality"] < 1e-5
    assert set(data["parts"][0]) >= {"householder_qr", "small_svd_lapack", "small_svd_gram"}
    try:  # --gram: the gram path against the randomized one; the gram path is exact, so it captures the most
        sys.path.insert(0, str(BENCH))
        mod.main(["--gram", "--shapes", "tiny", "--repeats", "1", "--out", str(tmp_path / "g.json")])
    finally:
        sys.path.remove(str(BENCH))
    row = json.loads((tmp_path / "g.json").read_text())["gram"][0]
    assert row["gram_s"] > 0 and row["fit_randomized_s"] > 0 and abs(row["fit_gram_s"] - 2 * row["gram_s"]) <= 0.002
    assert 0.9 < row["energy_cold_vs_exact"] <= 1 + 1e-5 and 0.9 < row["energy_warm_vs_exact"] <= 1 + 1e-5


def test_scale_smoke(tmp_path):
    """benchmarks/scale.py end to end at a toy shape: synthetic sharded checkpoint, streamed
    compression in a child process, per-layer timings, peak memory and the rendered table."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "benchmarks" / "scale.py"), "--shape", "smoke", "--layers", "2",
                        "--calib-tokens", "256", "--refine-steps", "0", "--results", str(tmp_path),
                        "--workdir", str(tmp_path), "--expert-read-gb", "1e-4"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "scale-smoke-cpu.json").read_text())
    assert [t["layer"] for t in res["per_layer"]] == [0, 1]
    # experts stored one tensor set per expert, as on the hub; 393 KB a layer read 2 experts at a time
    assert res["expert_chunks_read"] >= 2 * 8 // 2
    assert res["seconds_per_layer"] > 0 and res["peak_rss_gib"] > 0 and res["peak_gpu_gib"] is None
    assert "| smoke |" in (tmp_path / "scale.md").read_text()


def test_scale_records_what_it_saw_of_a_run_that_failed(tmp_path):
    """A run that dies (here a rank above the projection's full rank; at DeepSeek-V3's shape, twice,
    the kernel's OOM killer) leaves a record beside the results: exit status, wall time, the
    parent's sampled peak and timeline of the child's anonymous memory, the end of its stderr;
    the rendered table ignores it."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    results = tmp_path / "new-folder"  # made by the benchmark
    r = subprocess.run([sys.executable, str(root / "benchmarks" / "scale.py"), "--shape", "smoke", "--layers", "1",
                        "--calib-tokens", "256", "--refine-steps", "0", "--results", str(results),
                        "--workdir", str(tmp_path), "--set", "rank=100000", "--tag=-bad"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "compression failed (exit status 1" in r.stderr
    rec = json.loads((results / "failed-scale-smoke-cpu-bad.json").read_text())
    assert rec["returncode"] == 1 and rec["signal"] is None and rec["config"]["rank"] == 100000
    assert rec["wall_s"] > 0 and rec["sampled_peak_anon_gib"] > 0.05  # python, torch and transformers at least
    assert rec["timeline"] and rec["timeline"][0][0] < 1 and "rank" in rec["stderr_tail"]
    assert not list(results.glob("scale-*.json"))


def test_reference_rows_name_command_commit_value_tolerance(bench):
    """Every row ``make check-results`` re-runs names a script of this repository with its
    arguments, the JSON row it reads, a finite value, a documented relative tolerance and the
    commit + versions it was recorded at; rows sharing a command are measured by one run."""
    import subprocess

    cr = bench["check_results"]
    data = cr.load_reference()  # validates every row
    groups = cr.plan(data)
    assert sum(len(rows) for _, _, rows in groups) == len(data["rows"])
    assert len(groups) == len({tuple(r["command"]) for r in data["rows"]})
    root = Path(__file__).resolve().parents[1]
    if (root / ".git").exists():
        for r in data["rows"]:  # the recorded commit exists in this history
            c = r["recorded"]["commit"]
            assert subprocess.run(["git", "cat-file", "-e", f"{c}^{{commit}}"], cwd=root).returncode == 0, c
    assert cr.main(["--list"]) == 0
    assert cr.pick([{"model": "m", "level": 1.0, "ppl": 2.0}], {"model": "m", "level": 1}) is not None
    c = cr.compare({"id": "x", "value": 100.0, "tolerance": {"rel": 1e-3}}, 100.05)
    assert c["ok"] and not cr.compare({"id": "x", "value": 100.0, "tolerance": {"rel": 1e-4}}, 100.05)["ok"]


@pytest.mark.parametrize("field,bad", [("recorded", {"versions": {"transformers": "5"}}), ("tolerance", {"rel": 0}),
                                       ("tolerance", {"rel": 1e-4}), ("command", ["benchmarks/nope.py"]),
                                       ("value", float("nan"))])
def test_reference_rows_rejects_incomplete_rows(bench, field, bad):
    cr = bench["check_results"]
    data = cr.load_reference()
    data["rows"][0] = {**data["rows"][0], field: bad}
    with pytest.raises(cr.ReferenceError):
        cr.validate(data)


def test_check_results_fails_on_drift(bench, tmp_path, monkeypatch):
    """The exit status: 0 within tolerance, 1 on drift or a missing row (the commands are
    replaced by one that writes the JSON row the reference row selects)."""
    cr = bench["check_results"]
    row = {**cr.load_reference()["rows"][0], "value": 40.0, "tolerance": {"rel": 1e-5, "why": "test"}}
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps({"rows": [row]}))
    measured = {}

    def fake(cmd, out_dir, threads):
        rows = [{**row["select"], row["metric"]: measured["value"]}] if "value" in measured else []
        (out_dir / row["output"]).write_text(json.dumps({"rows": rows}))
        return 0, 0.0, 0.0, ""

    monkeypatch.setattr(cr, "run_command", fake)
    for value, status in ((40.0, 0), (40.0002, 0), (40.001, 1)):
        measured["value"] = value
        assert cr.main(["--reference", str(ref)]) == status, value
    measured.clear()
    assert cr.main(["--reference", str(ref)]) == 1  # the row is missing from the output
