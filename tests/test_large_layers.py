"""A layer larger than memory: its experts read a chunk at a time (:mod:`moecore.expert_source`,
the streaming store's ``CheckpointExperts``) and its Gram stacks in a memory-mapped scratch
file (:func:`moecore.fitting.gram_stack`, its lower triangle only:
:class:`moecore.gram_store.TriangularStack`), each giving the same bytes out as the in-memory
path; each block read once per expert-by-expert pass; outputs independent of where the
chunks fall."""
from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

import moecore
import moecore.checkpoint_reader as checkpoint_reader
import moecore.fitting as fitting
from moecore.api import compress_checkpoint
from moecore.checkpoint_reader import expert_keys, read_plan
from moecore.data import load_split
from moecore.expert_source import ExpertSource, ExpertView, InMemorySource, SourcedExperts, routed_outputs
from moecore.families import FUSED
from moecore.fitting import gram_stack
from moecore.gram_store import TriangularStack, scratch_tensor

from ._tiny_models import ROOT


class Counting(ExpertSource):
    """Experts copied out of ``views`` a chunk at a time, every read logged."""

    def __init__(self, views: dict[str, torch.Tensor], block: int):
        super().__init__({k: v.shape for k, v in views.items()}, views["gate"].dtype, "cpu", block)
        self.views, self.log = views, []

    def read(self, a, b):
        self.log.append((a, b))
        return {k: v[a:b].clone() for k, v in self.views.items()}


def _experts(e=7, h=16, f=12, seed=0) -> Qwen3MoeExperts:
    cfg = Qwen3MoeConfig(hidden_size=h, moe_intermediate_size=f, num_experts=e, num_experts_per_tok=2)
    torch.manual_seed(seed)
    m = Qwen3MoeExperts(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.2)
    return m


def _routed(n, e, h, k=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(n)])  # (n, k)
    return torch.randn(n, h, generator=g), idx, torch.rand(n, k, generator=g)


def test_an_expert_view_slices_like_the_tensor_and_reads_each_block_once():
    m = _experts(e=7)
    views = FUSED.split(m)
    src = Counting(views, block=3)
    gate = ExpertView(src, "gate")
    assert gate.shape == views["gate"].shape and gate.dtype == torch.float32 and gate.detach() is gate
    for e in range(7):  # an expert-by-expert pass: each block of 3 read once
        assert torch.equal(gate[e], views["gate"][e])
        assert torch.equal(ExpertView(src, "down")[e], views["down"][e])  # same chunk, no read
    assert src.log == [(0, 3), (3, 6), (6, 7)]
    assert torch.equal(gate[2:5], views["gate"][2:5]) and src.log[-1] == (2, 5)  # a range: read as asked
    assert torch.equal(gate[3:4], views["gate"][3:4]) and len(src.log) == 4  # inside the kept chunk
    assert torch.equal(gate[:], views["gate"]) and torch.equal(gate[-1], views["gate"][6])
    assert gate[5:5].shape == (0, 12, 16)
    with pytest.raises(IndexError):
        gate[7]
    with pytest.raises(TypeError):
        gate[::2]


def test_routed_outputs_do_not_depend_on_where_the_chunks_fall_and_match_the_family_forward():
    m = _experts(e=7)
    x, idx, w = _routed(40, 7, 16)
    idx[3, 1] = -1  # "no expert": adds nothing
    outs = []
    for block in (1, 3, 7):
        src = Counting(FUSED.split(m), block)
        outs.append(routed_outputs({k: ExpertView(src, k) for k in src.shapes}, FUSED,
                                   FUSED.activation_fn(m.act_fn), x, idx, w))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])  # bit for bit
    keep = (idx >= 0).all(1)
    with torch.no_grad():
        want = m(x[keep], idx[keep], w[keep])
        got = SourcedExperts(InMemorySource(m, FUSED), FUSED, m)(x[keep], idx[keep], w[keep])
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6) and torch.equal(got, outs[0][keep])
    stand_in = SourcedExperts(InMemorySource(m, FUSED), FUSED, m)
    assert FUSED.split(stand_in)["gate"].shape == (7, 12, 16) and stand_in.num_experts == 7
    stand_in.replay = [torch.ones(4, 16), 2 * torch.ones(2, 16)]  # replayed, one per call, in order
    assert float(stand_in(x[:4], idx[:4], w[:4]).sum()) == 64 and float(stand_in(x[:2], idx[:2], w[:2]).sum()) == 64


def test_a_layer_is_read_in_chunks_only_when_large_and_stored_per_expert():
    m = _experts(e=4, h=8, f=4)
    size = sum(p.numel() * p.element_size() for p in m.parameters())  # 4 experts x 3 x 8 x 4 x 4 bytes
    keys = [f"model.layers.0.mlp.experts.{j}.{p}.weight" for j in range(4) for p in ("gate_proj", "up_proj", "down_proj")]
    keys += ["model.layers.0.mlp.gate.weight", "model.layers.0.mlp.shared_experts.up_proj.weight"]
    per_expert = expert_keys(keys, 4)
    assert sorted(per_expert) == [0, 1, 2, 3] and all(len(v) == 3 for v in per_expert.values())
    assert read_plan(keys, m, FUSED, size) is None  # fits the limit: read whole
    assert read_plan(keys, m, FUSED, size // 2)[1] == 2  # half the bytes: 2 experts a chunk
    assert read_plan(keys, m, FUSED, 1)[1] == 1
    assert expert_keys(keys[:-5] + keys[-2:], 4) is None  # expert 3 incomplete
    assert expert_keys(keys + ["model.layers.0.mlp.experts.gate_up_proj"], 4) is None  # stored fused
    assert read_plan(keys + ["model.layers.0.mlp.experts.gate_up_proj"], m, FUSED, 1) is None


def _files(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.suffix == ".safetensors" or p.name == "config.json"}


@pytest.mark.parametrize("name,dtype,allocation", [("tiny-qwen3moe", "auto", "uniform"),
                                                   ("tiny-mixtral", "bfloat16", "greedy")])
def test_chunked_expert_reading_gives_the_same_bytes_as_whole_layer_reading(tmp_path, monkeypatch, name, dtype,
                                                                           allocation):
    reads = []
    real = checkpoint_reader.CheckpointExperts.read

    def logged(self, a, b):
        reads.append((self.block, a, b))
        return real(self, a, b)

    monkeypatch.setattr(checkpoint_reader.CheckpointExperts, "read", logged)
    texts = load_split("calib")[:6]
    common = dict(target_ratio=0.25, refine_steps=2, calib_max_tokens=1024, calib_seq_len=256, recover_steps=5,
                  allocation=allocation)
    whole = compress_checkpoint(ROOT / "models" / name, tmp_path / "whole", moecore.CompressionConfig(**common),
                                texts, dtype=dtype, progress=False)
    assert reads == []  # default limit (4 GiB): every layer read whole
    chunked = compress_checkpoint(ROOT / "models" / name, tmp_path / "chunked",
                                  moecore.CompressionConfig(**common, expert_read_gb=1e-4), texts, dtype=dtype,
                                  progress=False)
    blocks = {blk for blk, _, _ in reads}
    num_experts = max(b for _, _, b in reads)
    assert len(blocks) == 1 and 1 <= min(blocks) < num_experts  # chunks smaller than the layer
    single = [(a, b) for blk, a, b in reads if b - a <= blk]
    assert len(single) >= 2 * num_experts // min(blocks)  # calibration and Grams read block by block
    assert whole["ranks"] == chunked["ranks"]
    assert _files(tmp_path / "chunked") == _files(tmp_path / "whole")


def test_a_scratch_tensor_is_a_file_mapping_that_leaves_nothing_behind(tmp_path):
    t = scratch_tensor((3, 4, 4), torch.float32, tmp_path)
    assert list(tmp_path.iterdir()) == []  # unlinked at once: a killed run leaves no file
    t[1] = torch.arange(16.0).view(4, 4)
    assert float(t.sum()) == 120 and t.shape == (3, 4, 4)
    cfg = moecore.CompressionConfig(gram_host_gb=1e-6)
    big = gram_stack(4, 64, cfg, torch.device("cpu"), tmp_path)  # 4 x 64² x 8 bytes > 1 KiB: a file
    small = gram_stack(4, 64, moecore.CompressionConfig(gram_host_gb=1.0), torch.device("cpu"), tmp_path)
    assert isinstance(big, TriangularStack) and isinstance(small, torch.Tensor)
    assert big.dtype == small.dtype == torch.float64 and big.shape == small.shape == (4, 64, 64)
    assert big.data.untyped_storage().filename is not None and small.untyped_storage().filename is None
    assert list(tmp_path.iterdir()) == []


def test_a_stack_stays_in_memory_only_beside_what_the_fit_will_still_allocate(tmp_path, monkeypatch):
    """At DeepSeek-V3's shape the down projection's 4.3 GB stack was kept in memory, then 7.4 GB
    of factor stacks and the fit's working set followed it and the run was killed: the default
    limit is half of what is available less the fit's own reserve."""
    cfg = moecore.CompressionConfig()
    monkeypatch.setattr(fitting, "available_host_bytes", lambda: 4 * (4 * 64 * 64 * 8))
    assert isinstance(gram_stack(4, 64, cfg, torch.device("cpu"), tmp_path), torch.Tensor)
    assert isinstance(gram_stack(4, 64, cfg, torch.device("cpu"), tmp_path, reserve=3 * 4 * 64 * 64 * 8),
                      TriangularStack)
    meta = {"gate": torch.empty(256, 2048, 7168, device="meta"), "up": torch.empty(256, 2048, 7168, device="meta"),
            "down": torch.empty(256, 7168, 2048, device="meta")}
    reserve = fitting.fit_reserve(meta, {"gate": 392, "up": 392, "down": 392}, cfg, torch.device("cpu"))
    stacks = 256 * (2048 + 7168) * 784 * 4  # the ragged form's float32 stacks, padded to 2x the mean rank
    assert stacks < reserve < stacks + 3.5e9  # and a chunk's float32 working set (about 2.9 GB)
    assert fitting.fit_reserve(meta, {"gate": 392, "up": 392, "down": 392}, cfg, torch.device("cuda")) == 0


def test_one_gram_stack_at_a_time(monkeypatch):
    """gate and up share a stack; it is freed before the down projection's is built (the fit's
    loop once kept it alive through its loop variables: two stacks at once)."""
    import gc
    import weakref

    from tests._tiny_models import tiny_mixtral
    from moecore.calibration import RoutedInputs
    from moecore.families import find_experts

    model, _ = tiny_mixtral(0, hidden=64, layers=1, experts=4)
    _, module, layout = find_experts(model)[0]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=g)
    idx = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(256)])
    inputs = RoutedInputs(x, idx, torch.rand(256, 2, generator=g), 4, "routing")
    made, alive_at_creation = [], []
    real = fitting.gram_stack

    def tracked(*a, **k):
        alive_at_creation.append(sum(r() is not None for r in made))
        out = real(*a, **k)
        made.append(weakref.ref(out))
        return out
    monkeypatch.setattr(fitting, "gram_stack", tracked)
    gc.collect()
    fitting.fit_experts(module, layout, moecore.CompressionConfig(rank=4, refine_steps=1), {p: 4 for p in
                        ("gate", "up", "down")}, inputs, "cpu")
    assert alive_at_creation == [0, 0]  # the gate/up stack was gone when down's was built


def test_a_triangular_stack_keeps_symmetric_and_lower_triangular_stacks_exactly_in_half_the_bytes(tmp_path):
    e, d = 5, 70  # blocks of 16 rows: 5 blocks, the last one short
    x = torch.randn(e, 3 * d, d, dtype=torch.float64)
    grams = x.mT @ x
    grams = (grams + grams.mT) / 2  # exactly symmetric
    s = TriangularStack(e, d, torch.float64, tmp_path, block_rows=16)
    assert list(tmp_path.iterdir()) == [] and s.shape == (e, d, d) and len(s) == e
    dense_bytes = e * d * d * 8
    assert dense_bytes / 2 < s.nbytes < 0.65 * dense_bytes
    s[0:3] = grams[0:3]
    for j in (3, 4):
        s[j] = grams[j]
    assert torch.equal(s[:], grams) and torch.equal(s[1:4], grams[1:4]) and torch.equal(s[2], grams[2])
    s[1] += torch.eye(d, dtype=torch.float64)  # read, add, write back: what RoutedInputs.grams does
    assert torch.equal(s[1], grams[1] + torch.eye(d, dtype=torch.float64))
    low = torch.linalg.cholesky(grams)
    copy = s.clone()
    s[:] = low
    s.symmetric = False
    assert torch.equal(s[:], low) and torch.equal(s[4], low[4])
    assert torch.equal(copy[0], grams[0]) and copy.symmetric  # a copy of its own
    assert s[0:2].data_ptr() != s[0:2].data_ptr()  # each read is a new tensor


def test_grams_in_a_scratch_file_give_the_same_model_as_grams_in_memory(monkeypatch):
    spilled = []

    class Stack(TriangularStack):  # small row blocks, so that the tiny model's stacks span several
        def __init__(self, e, d, dtype, folder):
            spilled.append((e, d))
            super().__init__(e, d, dtype, folder, block_rows=24)
    monkeypatch.setattr(fitting, "TriangularStack", Stack)
    model = AutoModelForCausalLM.from_pretrained(ROOT / "models" / "tiny-qwen3moe", dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(ROOT / "models" / "tiny-qwen3moe")
    texts = load_split("calib")[:4]
    common = dict(target_ratio=0.25, refine_steps=2, calib_max_tokens=512, calib_seq_len=128, recover_steps=0)
    a = moecore.compress(copy.deepcopy(model), moecore.CompressionConfig(**common), texts, tok, progress=False)
    assert spilled == []  # default: half the available memory
    b = moecore.compress(model, moecore.CompressionConfig(**common, gram_host_gb=1e-6), texts, tok, progress=False)
    layers = model.config.num_hidden_layers
    assert len(spilled) == 2 * layers  # the gate/up and the down stack of every layer
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_resume_may_change_the_memory_limits_but_not_what_decides_the_output():
    from moecore.streaming import fingerprint

    src = ROOT / "models" / "tiny-qwen3moe"
    seqs = [torch.arange(16)]
    base = fingerprint(src, moecore.CompressionConfig(), seqs, torch.float32, "cpu")
    limits = fingerprint(src, moecore.CompressionConfig(expert_read_gb=0.5, gram_host_gb=2.0), seqs, torch.float32,
                         "cpu")
    assert limits == base  # same_output fields: tested above to give the same bytes
    assert fingerprint(src, moecore.CompressionConfig(rank=4), seqs, torch.float32, "cpu") != base
    assert "expert_read_gb" not in moecore.CompressionConfig().output_dict()
    assert "expert_read_gb" in moecore.CompressionConfig().to_dict()  # still saved beside the output


@pytest.mark.parametrize("form", ["delta", "ragged", "basis"])
def test_a_module_built_in_the_checkpoint_dtype_equals_the_float32_module_cast(form):
    """``fit_experts(dtype=float32, store_dtype=bfloat16)`` (what the engine does for a module
    it neither trains nor runs: its finished projections then take half the bytes during the
    fit, 3.7 GB at DeepSeek-V3's shape) gives the same bits as the float32 module cast."""
    from tests._tiny_models import tiny_mixtral
    from moecore.calibration import RoutedInputs
    from moecore.families import find_experts

    model, _ = tiny_mixtral(0, hidden=64, layers=1, experts=4)
    _, module, layout = find_experts(model)[0]
    module.to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=g)
    idx = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(256)])
    inputs = RoutedInputs(x, idx, torch.rand(256, 2, generator=g), 4, "routing")
    cfg = moecore.CompressionConfig(rank=4, refine_steps=1, form=form)
    ranks = {p: 4 for p in ("gate", "up", "down")}
    wide = fitting.fit_experts(module, layout, cfg, ranks, inputs, "cpu", dtype=torch.float32)
    narrow = fitting.fit_experts(module, layout, cfg, ranks, inputs, "cpu", dtype=torch.float32,
                                 store_dtype=torch.bfloat16)
    want = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in wide.state_dict().items()}
    got = narrow.state_dict()
    assert got.keys() == want.keys() and all(got[k].dtype == want[k].dtype for k in got)
    assert all(torch.equal(got[k], want[k]) for k in got)
    assert narrow.report == wide.report
