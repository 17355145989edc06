"""Build the offline lm-eval task data from the bundled held-out split (deterministic).

Writes ``src/moecore/tasks/heldout_ppl.jsonl`` (passages for a rolling-loglikelihood
perplexity task) and ``src/moecore/tasks/heldout_mc.jsonl`` (pick the true next sentence
among 4, distractors drawn from other held-out documents). Only the held-out split is read.
Run: ``python scripts/make_eval_tasks.py`` (the output is committed; rerunning gives the
same bytes).
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

from moecore.data import load_split

OUT = Path(__file__).resolve().parents[1] / "src" / "moecore" / "tasks"
N_PPL, PPL_CHARS = 64, 1500
N_MC, CTX_CHARS = 200, 400
SEED = 1234
_SENT = re.compile(r"(?<=[.!?])\s+")


def _passage(text: str, limit: int) -> str:
    """The start of ``text`` cut at the last sentence end (else whitespace) before ``limit``."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    head = text[:limit]
    cut = max(head.rfind(". "), head.rfind("? "), head.rfind("! "))
    return head[: cut + 1] if cut > limit // 2 else head[: head.rfind(" ")]


def ppl_docs(texts: list[str]) -> list[dict]:
    pool = [t for t in texts if len(t) >= 500]
    step = len(pool) / N_PPL
    return [{"id": f"ppl-{i}", "text": _passage(pool[int(i * step)], PPL_CHARS)} for i in range(N_PPL)]


def mc_docs(texts: list[str]) -> list[dict]:
    rng = random.Random(SEED)
    sents = [[s for s in _SENT.split(" ".join(t.split())) if s] for t in texts]
    candidates = []  # (doc index, sentence index)
    for d, ss in enumerate(sents):
        for j in range(1, len(ss)):
            if 20 <= len(ss[j]) <= 200 and len(" ".join(ss[:j])) >= 100:
                candidates.append((d, j))
    rng.shuffle(candidates)
    items, per_doc = [], {}
    for d, j in candidates:
        if len(items) == N_MC:
            break
        if per_doc.get(d, 0) >= 2:
            continue
        target = sents[d][j]
        context = " ".join(sents[d][:j])[-CTX_CHARS:]
        context = context[context.find(" ") + 1:] if len(context) == CTX_CHARS else context
        distract: list[str] = []
        for _ in range(1000):
            od = rng.randrange(len(sents))
            if od == d or not sents[od]:
                continue
            s = rng.choice(sents[od])
            if 0.5 * len(target) <= len(s) <= 2 * len(target) and s != target and s not in distract:
                distract.append(s)
            if len(distract) == 3:
                break
        if len(distract) < 3:
            continue
        label = rng.randrange(4)
        choices = distract[:label] + [target] + distract[label:]
        items.append({"id": f"mc-{len(items)}", "context": context, "choices": choices, "label": label})
        per_doc[d] = per_doc.get(d, 0) + 1
    return items


def _write(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


def main() -> None:
    texts = load_split("heldout")
    _write(OUT / "heldout_ppl.jsonl", ppl_docs(texts))
    mc = mc_docs(texts)
    _write(OUT / "heldout_mc.jsonl", mc)
    print(f"wrote {N_PPL} perplexity passages and {len(mc)} multiple-choice items to {OUT}")


if __name__ == "__main__":
    main()
