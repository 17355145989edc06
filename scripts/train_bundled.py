"""Train the two bundled models on the train split of the bundled corpus (seeded).

  tiny-mixtral : Mixtral, 8 experts, top-2, built by *upcycling*: a dense Mistral model with
                 the same dimensions is trained first, its MLP is copied into every expert
                 with 1% Gaussian noise, then training continues as MoE.
  tiny-qwen3moe: Qwen3-MoE, 32 fine-grained experts, top-4, trained from scratch.

Usage: python scripts/train_bundled.py {tiny-mixtral|tiny-qwen3moe} [-o models/NAME] [--threads N]
Step counts are fixed in SPECS, so a run reproduces bit for bit on the same machine and
library versions. Weights are saved in bfloat16 with `save_pretrained` (safetensors).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from transformers import (AutoTokenizer, MistralConfig, MistralForCausalLM, MixtralConfig,
                          MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM)

from moecore.data import load_split
from moecore.evaluation import token_stream

COMMON = dict(vocab_size=4096, hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=4, max_position_embeddings=1024, tie_word_embeddings=True,
              rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=0, pad_token_id=1)
SPECS = {
    "tiny-mixtral": dict(dense_steps=800, moe_steps=800, lr=2e-3, seq=256, batch=16,
                         config=dict(intermediate_size=384, num_local_experts=8, num_experts_per_tok=2,
                                     router_aux_loss_coef=0.01, output_router_logits=True)),
    "tiny-qwen3moe": dict(dense_steps=0, moe_steps=1400, lr=2e-3, seq=256, batch=16,
                          config=dict(moe_intermediate_size=96, intermediate_size=384, num_experts=32,
                                      num_experts_per_tok=4, head_dim=32, norm_topk_prob=True,
                                      decoder_sparse_step=1, mlp_only_layers=[],
                                      router_aux_loss_coef=0.01, output_router_logits=True)),
}
SEED = 1234


def train(model, stream, steps: int, lr: float, seq: int, batch: int, seed: int, tag: str, log: list):
    """AdamW with linear warm-up and cosine decay on random windows of the stream."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    model.train()
    t0 = time.time()
    for step in range(steps):
        starts = torch.randint(0, len(stream) - seq - 1, (batch,), generator=g)
        x = torch.stack([stream[s:s + seq] for s in starts])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=x, labels=x)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); sched.step(); opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps - 1:
            lm = getattr(out, "aux_loss", None)
            rec = {"phase": tag, "step": step, "loss": round(out.loss.item(), 4),
                   "aux_loss": None if lm is None else round(lm.item(), 4),
                   "lr": sched.get_last_lr()[0], "elapsed_s": round(time.time() - t0, 1)}
            log.append(rec)
            print(json.dumps(rec), flush=True)


def upcycle(dense: MistralForCausalLM, cfg: MixtralConfig, noise: float, seed: int) -> MixtralForCausalLM:
    """Copy the dense model into a Mixtral; every expert gets the dense MLP plus `noise`-relative jitter."""
    torch.manual_seed(seed)
    moe = MixtralForCausalLM(cfg)
    sd = {k: v for k, v in dense.state_dict().items() if ".mlp." not in k}
    missing, unexpected = moe.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    for dl, ml in zip(dense.model.layers, moe.model.layers):
        gate_up = torch.cat([dl.mlp.gate_proj.weight, dl.mlp.up_proj.weight], 0)  # (2F, H)
        down = dl.mlp.down_proj.weight  # (H, F)
        with torch.no_grad():
            for e in range(cfg.num_local_experts):
                ml.mlp.experts.gate_up_proj[e] = gate_up + noise * gate_up.std() * torch.randn_like(gate_up)
                ml.mlp.experts.down_proj[e] = down + noise * down.std() * torch.randn_like(down)
    return moe


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("name", choices=sorted(SPECS))
    ap.add_argument("-o", "--output")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--tokenizer", default="data/tokenizer")
    ap.add_argument("--steps-scale", type=float, default=1.0, help="scale step counts (smoke tests only)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = SPECS[args.name]
    out = Path(args.output or f"models/{args.name}")
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    stream = token_stream(tok, load_split("train"))  # train documents joined with EOS
    print(f"train stream: {len(stream)} tokens", flush=True)
    torch.manual_seed(SEED)
    log: list = []
    dense_steps = int(spec["dense_steps"] * args.steps_scale)
    moe_steps = int(spec["moe_steps"] * args.steps_scale)
    t0 = time.time()
    if args.name == "tiny-mixtral":
        dcfg = MistralConfig(**COMMON, intermediate_size=spec["config"]["intermediate_size"])
        dense = MistralForCausalLM(dcfg)
        train(dense, stream, dense_steps, spec["lr"], spec["seq"], spec["batch"], SEED, "dense", log)
        model = upcycle(dense, MixtralConfig(**COMMON, **spec["config"]), noise=0.01, seed=SEED)
    else:
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**COMMON, **spec["config"]))
    train(model, stream, moe_steps, spec["lr"], spec["seq"], spec["batch"], SEED + 1, "moe", log)
    model.config.output_router_logits = False
    model.to(torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)
    tokens = (dense_steps + moe_steps) * spec["seq"] * spec["batch"]
    meta = {"name": args.name, "seed": SEED, "dense_steps": dense_steps, "moe_steps": moe_steps,
            "seq_len": spec["seq"], "batch": spec["batch"], "train_tokens_seen": tokens,
            "train_seconds": round(time.time() - t0), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "log": log}
    (out / "training_log.json").write_text(json.dumps(meta, indent=1))
    print(f"saved {out} after {meta['train_seconds']} s, {tokens} tokens", flush=True)


if __name__ == "__main__":
    main()
