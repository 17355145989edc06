"""The layer engine streamed from and to sharded safetensors, for models that don't fit in
memory: :func:`run` is the one entry (what :func:`moecore.compress_checkpoint` delegates to,
after validating its inputs); it owns the skeleton, the state, resume and the finish.

* The model skeleton is built from ``config.json`` with empty (meta) weights, and each
  decoder layer's tensors are read from the shards through transformers' own loading
  (:mod:`moecore.checkpoint_reader`).  Apart from the embeddings and the head, at most one
  decoder layer of original weights is in memory.
* Each finished layer is written as its own shard into ``.OUT.partial/`` (atomically), with
  the calibration activations it produced and a state file.  ``resume=True`` continues
  after a kill from the first unfinished layer; a fingerprint of the model, the config, the
  calibration tokens, the dtype, the device type and the moecore version stops a resume into
  a different job.  Only at the end are ``config.json`` and the index written and the folder
  published as ``OUT`` (see :mod:`moecore.io_utils`): nothing half-written looks complete.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.utils.hub import convert_file_size_to_int

from .checkpoint_format import build_quantization_config, load_guards, swap_in_compressed
from .checkpoint_reader import INDEX, CheckpointExperts, CheckpointReader, open_skeleton, read_plan, weight_files
from .config import CompressionConfig
from .engine import Engine, experts_by_layer
from .expert_source import ExpertSource, InMemorySource
from .heap import bounded_host_heap
from .errors import CheckpointError, ConfigError, UnsupportedModelError
from .families import ExpertsLayout, is_compressed
from .hf_integration import MoecoreQuantizationConfig
from .io_utils import (atomic_write_text, converting_write_errors, disk_full, protected_input, publish_dir, remove_tree,
                       say, umask, user_path)
from .model_card import write_model_card
from .resume import (STATE, Fingerprint, WorkLock, check_source, partial_dir, published_state, read_state,
                     tidy_published, write_state)
from .stats import STATS_FILENAME, statistics, write_statistics_yaml
from .version import __version__


# ---------------------------------------------------------------------------- writing / state
def _save(tensors: dict[str, torch.Tensor], path: Path) -> str:
    """safetensors file written to a temporary name, fsynced and renamed: whole or absent.
    Returns its sha256 (read back once while it is in the page cache), which the state records
    so that a resume can check the file is still the one written."""
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
    os.chmod(tmp, 0o666 & ~umask())  # safetensors creates 0600; outputs follow the umask
    os.replace(tmp, path)
    return digest


def _sha256(path: Path) -> str | None:
    try:
        with open(path, "rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()
    except OSError:
        return None


def check_work(work: Path, state: dict[str, Any]) -> None:
    """Before a resume continues: every file the state records as written (layer shards, the
    activations, the merged file) is present and unchanged (its sha256); ``CheckpointError``
    naming the first that is not.  (States of older versions record no hashes: not checked.)"""
    for name, digest in sorted(state.get("files", {}).items()):
        if _sha256(work / name) != digest:
            what = "is missing" if not (work / name).exists() else "changed since it was written"
            raise CheckpointError(f"cannot resume from {work}: {name} {what}; remove the folder or pass --overwrite "
                                  f"to start over")


def fault_point(step: str) -> None:
    """Fault injection for the kill tests: ``MOECORE_KILL_AT=step`` SIGKILLs this process at
    that step of the per-layer commit or of :func:`finish` (nothing else reads it)."""
    if os.environ.get("MOECORE_KILL_AT") == step:
        os.kill(os.getpid(), signal.SIGKILL)


def _write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def fingerprint(model_dir: Path, cfg: CompressionConfig, seqs, dtype, device) -> Fingerprint:
    """sha256 over what decides the output: config.json, the weight files (names, sizes,
    headers), the compression config, the calibration token ids, dtype, device type and the
    moecore version; the :class:`~moecore.resume.Fingerprint` also carries each component
    (a digest, or the value itself), so a refused resume can name what differs."""

    h = hashlib.sha256()
    parts: dict[str, Any] = {}

    def part(name: str, *chunks: bytes) -> None:
        one = hashlib.sha256()
        for c in chunks:
            h.update(c)
            one.update(c)
        parts[name] = one.hexdigest()[:16]

    part("model_config", (model_dir / "config.json").read_bytes())
    weights = []
    for f in sorted(set(weight_files(model_dir).values())):
        weights += [f.name.encode(), str(f.stat().st_size).encode()]
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            weights.append(fh.read(min(n, 1 << 24)))
    part("weights", *weights)
    cfg_text = json.dumps(cfg.output_dict(), sort_keys=True, default=str)  # memory limits may change on resume
    part("compression_config", cfg_text.encode())
    parts["compression_config"] = json.loads(cfg_text)
    part("calibration", *[s.numpy().tobytes() for s in seqs or []])
    dev = torch.device(device).type
    h.update(f"{dtype}|{dev}|{__version__}".encode())
    parts.update(dtype=str(dtype), device=dev, version=__version__)
    return Fingerprint(h.hexdigest(), parts)


class StreamingStore:
    """:class:`~moecore.engine.LayerStore` that reads each layer from the checkpoint, writes
    each compressed layer as one shard of the work folder, and frees it."""

    def __init__(self, reader: CheckpointReader, work: Path, stack_path: str, num_layers: int, device,
                 state: dict[str, Any], experts: dict[int, list] | None = None, read_gb: float = 4.0):
        self.reader, self.work, self.stack_path, self.device, self.state = reader, work, stack_path, device, state
        self.num_shards = num_layers + 1
        self.experts_of, self.read_bytes = experts or {}, int(read_gb * (1 << 30))
        self.chunked: dict[str, tuple[dict[int, list[str]], int]] = {}  # the layer's experts read a chunk at a time
        if state.get("num_layers") != num_layers:  # for the line an interrupted run prints
            state["num_layers"] = num_layers
            write_state(work, state)

    def load(self, index: int, layer: nn.Module) -> None:
        keys = self.reader.by_layer.get(index, [])
        prefix = f"{self.stack_path}.{index}"
        self.chunked = {}
        mods = self.experts_of.get(index, [])
        if len(mods) == 1 and mods[0][1].call == "routed":  # one routed experts module: chunks if large
            plan = read_plan(keys, layer.get_submodule(mods[0][0]), mods[0][1], self.read_bytes)
            if plan is not None:
                self.chunked[mods[0][0]] = plan
        # the content hash of the layer's source tensors, recorded when the layer is done
        if not self.chunked:
            self.source = self.reader.load(keys, prefix, self.device)
            return
        self.source = self.reader.digest(keys)
        skip = {k for rel, (per_expert, _) in self.chunked.items() for ks in per_expert.values() for k in ks}
        self.reader.load([k for k in keys if k not in skip], prefix, self.device, exclude=tuple(self.chunked))

    def experts(self, index: int, rel: str, layout: ExpertsLayout, module: nn.Module) -> ExpertSource:
        if rel in self.chunked:
            per_expert, block = self.chunked[rel]
            return CheckpointExperts(self.reader, f"{self.stack_path}.{index}.{rel}", module, layout, per_expert,
                                     self.device, block)
        return InMemorySource(module, layout)

    def release(self, index: int, layer: nn.Module) -> None:
        layer.to("meta")

    def done(self, index: int, layer: nn.Module, hidden) -> None:
        prefix = f"{self.stack_path}.{index}."
        name = shard_name(index, self.num_shards)
        digest = _save({prefix + k: v for k, v in layer.state_dict().items()}, self.work / name)
        fault_point("layer:shard")
        files = self.state.setdefault("files", {})
        files[name] = digest
        self.state.setdefault("source", {})[str(index)] = self.source

        if is_compressed(layer, recurse=True):
            # through JSON now, so a resumed run (which reads the state back) sees the same values in the same order
            q = json.loads(json.dumps(build_quantization_config(layer), sort_keys=True))
            self.state.setdefault("layers", {}).update({prefix + k: v for k, v in q["layers"].items()})
            self.state.setdefault("qconfig", {k: v for k, v in q.items() if k != "layers"})
        acts = None
        if hidden is not None:
            acts = f"activations-{index:05d}.safetensors"
            files[acts] = _save({f"batch.{b}": h for b, h in enumerate(hidden)}, self.work / acts)
        old = self.state.get("activations")
        if old and old != acts:
            files.pop(old, None)
        self.state.update(done=index + 1, activations=acts)
        write_state(self.work, self.state)  # the commit point of this layer
        fault_point("layer:committed")
        if old and old != acts:
            (self.work / old).unlink(missing_ok=True)
        layer.to("meta")


def load_activations(work: Path, state: dict[str, Any]) -> list[torch.Tensor]:
    """The calibration activations the last finished layer produced (the next layer's inputs)."""

    t = load_file(str(work / state["activations"]))
    return [t[f"batch.{b}"] for b in range(len(t))]


def _index(work: Path) -> dict[str, Any]:
    weight_map, total = {}, 0
    for f in sorted(work.glob("model-*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                weight_map[k] = f.name
                sl = fh.get_slice(k)
                n = 1
                for d in sl.get_shape():
                    n *= d
                total += n * torch.empty(0, dtype=getattr(torch, _ST_DTYPES[sl.get_dtype()])).element_size()
    return {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}


_ST_DTYPES = {"F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _consolidate(work: Path, state: dict[str, Any]) -> None:
    """Merge the per-layer shards into one ``model.safetensors`` (a small model, like
    ``save_pretrained`` below its shard size).  Idempotent: the shards are deleted only after
    the state records the merged file (and its hash), and a rerun after that only deletes."""
    shards = sorted(work.glob("model-*.safetensors"))
    if not state.get("merged"):
        tensors: dict[str, torch.Tensor] = {}
        for f in shards:
            tensors.update(load_file(str(f)))
        digest = _save(tensors, work / "model.safetensors")
        fault_point("finish:merged-file")
        state["files"] = {"model.safetensors": digest}
        state["merged"] = True
        write_state(work, state)
        fault_point("finish:merged")
    for f in shards:
        f.unlink(missing_ok=True)


def finish(work: Path, src: Path, model: nn.Module, hf_cfg, stack_path: str, state: dict[str, Any],
           config: CompressionConfig, tokenizer, max_shard_size: int | str = "5GB") -> None:
    """Write what makes ``work`` a checkpoint: the non-layer shard, ``config.json`` with the
    ``quantization_config``, the index (or, when everything fits ``max_shard_size``, one
    ``model.safetensors`` as ``save_pretrained`` writes it), statistics, the model card,
    the compression config, the tokenizer; then drop the activations and mark the state
    ``finished`` (the state file itself goes once the folder is published).  Everything is
    derived from the stored state, so a resumed run writes the same bytes as an uninterrupted
    one, and a run killed at any step of it can be resumed (:func:`fault_point` names them)."""
    if state.get("merged"):  # killed after the merge: only its clean-up is left
        _consolidate(work, state)
        _finished(work, state)
        return
    n_layers = len(model.get_submodule(stack_path))
    rest, seen = {}, set()
    for k, v in model.state_dict(keep_vars=True).items():
        if k.startswith(stack_path + ".") or id(v) in seen:
            continue  # layers are in their shards; tied duplicates (lm_head = embeddings) once
        seen.add(id(v))
        rest[k] = v
    qdict = {**state["qconfig"], "moecore_version": __version__, "layers": state["layers"]}
    dtype = next(iter(rest.values())).dtype
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype)
    swap_in_compressed(meta, qdict, dtype=dtype)
    _save({**rest, **load_guards(meta)}, work / shard_name(n_layers, n_layers + 1))  # guards: checkpoint_format
    fault_point("finish:rest")
    stats = statistics(meta)
    write_statistics_yaml(stats, work / STATS_FILENAME)
    write_model_card(work, stats, source=str(src), config=config.to_dict())
    hf_cfg.quantization_config = MoecoreQuantizationConfig.from_dict(qdict)
    hf_cfg.dtype = dtype
    hf_cfg.save_pretrained(work)
    if (src / "generation_config.json").is_file():
        shutil.copyfile(src / "generation_config.json", work / "generation_config.json")
    if tokenizer is not None:
        tokenizer.save_pretrained(work)
    config.save(work)
    fault_point("finish:written")
    index = _index(work)
    limit = convert_file_size_to_int(max_shard_size) if isinstance(max_shard_size, str) else int(max_shard_size)
    if index["metadata"]["total_size"] <= limit:
        _consolidate(work, state)
    else:
        _write_json(work / INDEX, index)
    _finished(work, state)


def _finished(work: Path, state: dict[str, Any]) -> None:
    """Drop the activations and record that ``work`` holds the whole model."""
    for f in work.glob("activations-*.safetensors"):
        f.unlink(missing_ok=True)
    state["files"] = {k: v for k, v in state.get("files", {}).items() if not k.startswith("activations-")}
    state.update(finished=True, activations=None)
    write_state(work, state)
    fault_point("finish:done")


# ---------------------------------------------------------------------------- the run
def run(src: Path, out: Path, config: CompressionConfig, seqs: list[torch.Tensor] | None, tokenizer, *,
        device: torch.device, dtype: torch.dtype | str | None, resume: bool, overwrite: bool, progress: bool,
        max_shard_size: int | str) -> dict[str, Any]:
    """Compress the checkpoint in ``src`` into ``out`` (inputs already validated by
    :func:`moecore.api.compress_checkpoint`, which documents the arguments): skeleton, state
    (a resume checks the :func:`fingerprint`), the engine over every layer, :func:`finish`,
    publish.  On failure nothing half-written is left as ``out``; the finished layers stay in
    the work folder for ``resume`` unless there is nothing worth resuming.  Returns the summary."""
    hf_cfg, model, dtype = open_skeleton(src, dtype)
    reader = CheckpointReader(src, model, dtype, experts_by_layer(model)[0].rpartition(".")[2])
    work = partial_dir(out)
    held = protected_input(work) if work.exists() else None
    if held is not None:
        raise CheckpointError(f"the work folder of {out} would be {work}, which is (or holds) the input "
                              f"{held}: choose another output name")
    fp = fingerprint(src, config, seqs, dtype, device)
    leftover = published_state(out) if resume and not work.exists() else None
    if leftover is not None:
        tidied = tidy_published(out, leftover, fp, overwrite)
        if tidied is not None:
            return tidied
    with WorkLock() as lock:
        with user_path(out, "write"):
            lock.hold(work)  # one writer per output: fails at once while another run holds it
            state = read_state(work, fp, resume, overwrite)
            lock.hold(work)  # the folder read_state made (or kept)
        check_work(work, state)
        if state["done"] or state.get("finished"):
            check_source(reader, work, state, progress)
        return _run_guarded(src, out, work, reader, model, hf_cfg, dtype, tokenizer, seqs, config, state, device,
                            progress, overwrite, max_shard_size)


def _run_guarded(src, out, work, reader, model, hf_cfg, dtype, tokenizer, seqs, config, state, device, progress,
                 overwrite, max_shard_size) -> dict[str, Any]:
    """:func:`_run`, and on failure what the work folder keeps: nothing when no layer was
    finished or the input was bad; otherwise the finished layers, with how to resume."""
    try:
        with converting_write_errors(out), bounded_host_heap():
            return _run(src, out, work, reader, model, hf_cfg, dtype, tokenizer, seqs, config, state, device,
                        progress, overwrite, max_shard_size)
    except Exception as exc:
        full = disk_full(exc.__cause__ or exc)
        bad_input = isinstance(exc, (CheckpointError, UnsupportedModelError, ConfigError)) and not full
        if state["done"] == 0 or bad_input:  # nothing worth resuming: leave nothing behind
            remove_tree(work)
            raise
        if full:
            raise CheckpointError(f"{exc}; the {state['done']} finished layer(s) are kept in {work}: free space "
                                  f"and rerun with --resume (or delete that folder)") from exc
        say(f"the {state['done']} finished layer(s) are kept in {work}: rerun with --resume to continue")
        raise


def _run(src, out, work, reader, model, hf_cfg, dtype, tok, seqs, config, state, device, progress, overwrite,
         max_shard_size) -> dict[str, Any]:
    """:func:`run` proper: read the embeddings and head, solve (or restore) the ranks, run the
    engine from the first unfinished layer, finish and publish (a work folder whose state says
    it is finished is published as it is)."""
    if state.get("finished"):
        say(f"{work} holds the finished model: publishing it")
        return _publish(work, out, overwrite, {"output": str(out), "resumed_at_layer": state["done"], "timings": [],
                                               "recovery": [], "ranks": state["ranks"], "dtype": str(dtype),
                                               "device": str(device)})
    stack_path = experts_by_layer(model)[0]
    rest = reader.load(reader.by_layer.get(None, []), "", device, exclude=(stack_path,))  # embeddings, norm, head
    state.setdefault("source", {})["rest"] = rest  # committed with the first layer
    store = StreamingStore(reader, work, stack_path, len(model.get_submodule(stack_path)), device, state,
                           experts=experts_by_layer(model)[2], read_gb=config.expert_read_gb)
    engine = Engine(model, config, store, seqs, device=device, progress=progress, scratch=work)
    hidden = engine.first_inputs()
    start = state["done"]
    if "ranks" in state:
        ranks = {tuple(k.split("|")): r for k, r in state["ranks"].items()}
    else:
        ranks = engine.solve(hidden)
        state["ranks"] = {"|".join(k): r for k, r in ranks.items()}
        write_state(work, state)
    if start and hidden is not None:
        hidden = load_activations(work, state)
    engine.run(ranks, hidden, start)
    finish(work, src, model, hf_cfg, stack_path, state, config, tok, max_shard_size)
    return _publish(work, out, overwrite, {"output": str(out), "resumed_at_layer": start, "timings": engine.timings,
                                           "recovery": engine.recovery, "ranks": state["ranks"], "dtype": str(dtype),
                                           "device": str(device)})


def _publish(work: Path, out: Path, overwrite: bool, summary: dict[str, Any]) -> dict[str, Any]:
    """Publish the finished ``work`` folder as ``out`` (atomically), then drop its state file."""
    publish_dir(work, out, overwrite)
    fault_point("published")
    (out / STATE).unlink(missing_ok=True)
    return summary
