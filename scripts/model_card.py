"""Measure a bundled model and write its model card (README.md + model_card.json beside it).

Usage: python scripts/model_card.py models/tiny-mixtral [models/tiny-qwen3moe ...]
Records: held-out perplexity under the pinned protocol against a unigram baseline,
parameters and bytes, router load per layer (calibration split), mean pairwise expert
cosine and residual structure per layer, and the training log summary.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import transformers

from moecore.analysis import expert_cosine, param_counts, residual_profile, router_load
from moecore.data import load_split
from moecore.evaluation import PPL_PROTOCOL, perplexity, token_stream, unigram_perplexity
from moecore.io_utils import atomic_write_text
from moecore.modeling import load_model


def measure(model_dir: Path) -> dict:
    model, tok = load_model(model_dir)
    held = token_stream(tok, load_split("heldout"))
    res = perplexity(model, tok, stream=held)
    # every 6th held-out document (all three sources, about a quarter of the tokens): what the
    # test suite re-scores, and the documents `make demo` scores
    sub = perplexity(model, tok, stream=token_stream(tok, load_split("heldout")[::6]))
    train = token_stream(tok, load_split("train"))
    calib = token_stream(tok, load_split("calib"))
    load = router_load(model, calib)
    train_log = json.loads((model_dir / "training_log.json").read_text())
    return {
        "name": model_dir.name, "architecture": model.config.architectures[0],
        "heldout_perplexity": res.as_dict(), "protocol": PPL_PROTOCOL,
        "heldout_perplexity_every_6th_document": {**sub.as_dict(), "doc_stride": 6},
        "unigram_baseline_perplexity": unigram_perplexity(train, held, len(tok)),
        **param_counts(model, stored_dtype=torch.bfloat16), "stored_dtype": "bfloat16",
        "num_experts": len(load[0]), "top_k": model.config.num_experts_per_tok,
        "router_load_per_layer": load,
        "router_load_max_over_uniform": [max(layer) * len(layer) for layer in load],
        "expert_cosine_per_layer": expert_cosine(model),
        "residual_per_layer": residual_profile(model),
        "training": {k: v for k, v in train_log.items() if k != "log"},
        "final_train_loss": train_log["log"][-1]["loss"],
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }


def card(m: dict) -> str:
    t = m["training"]
    how = ("upcycled: a dense Mistral model with the same dimensions trained for "
           f"{t['dense_steps']} steps, its MLP copied into every expert with 1% noise, then "
           f"{t['moe_steps']} MoE steps" if t["dense_steps"] else f"trained from scratch for {t['moe_steps']} steps")
    ppl = m["heldout_perplexity"]
    rows = "\n".join(
        f"| {i} | {c:.3f} | {r['rel_residual']:.3f} | {list(r.values())[1]:.3f} | {mx:.2f} |"
        for i, (c, r, mx) in enumerate(zip(m["expert_cosine_per_layer"], m["residual_per_layer"],
                                           m["router_load_max_over_uniform"])))
    return f"""---
license: other
library_name: transformers
tags: [moe, moecore, tiny]
---
# {m['name']}

A tiny `{m['architecture']}` ({m['num_experts']} experts, top-{m['top_k']}) shipped with moecore so
that compression can be measured on a real MoE trained on real text. {how[0].upper() + how[1:]}, on the
train split of the bundled corpus (KJV Bible, Jargon File, Python 3.11 docs; see
`data/PROVENANCE.md`), sequence length {t['seq_len']}, batch {t['batch']}, {t['train_tokens_seen']:,}
training tokens, seed {t['seed']}, {t['train_seconds']} s on {t['threads']} CPU thread(s).
Reproduce with `python scripts/train_bundled.py {m['name']}`.

| | value |
|---|---|
| parameters (total / experts) | {m['params_total']:,} / {m['params_experts']:,} |
| bytes (bfloat16, total / experts) | {m['bytes_total']:,} / {m['bytes_experts']:,} |
| held-out perplexity | **{ppl['ppl']:.3f}** |
| unigram baseline perplexity | {m['unigram_baseline_perplexity']:.1f} |
| final training loss | {m['final_train_loss']} |

Perplexity protocol: held-out split, documents joined with EOS, sliding window
seq_len {ppl['seq_len']}, stride {ppl['stride']}, {ppl['tokens_scored']:,} tokens scored, float32.
Measure again with `moecore eval models/{m['name']}`.

Per layer: mean pairwise cosine of the experts, ‖W − mean‖/‖W‖, share of the residual
energy in its top 25% singular values, and the busiest expert's load over uniform
(router on the calibration split):

| layer | expert cosine | rel. residual | energy @25% rank | max load / uniform |
|---|---|---|---|---|
{rows}

Numbers in `model_card.json`.
"""


def main() -> None:
    for d in sys.argv[1:]:
        d = Path(d)
        m = measure(d)
        atomic_write_text(d / "model_card.json", json.dumps(m, indent=1))
        atomic_write_text(d / "README.md", card(m))
        print(f"{d.name}: ppl {m['heldout_perplexity']['ppl']:.3f} (unigram {m['unigram_baseline_perplexity']:.1f}), "
              f"cosine {[round(c, 3) for c in m['expert_cosine_per_layer']]}")


if __name__ == "__main__":
    main()
