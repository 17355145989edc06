"""Train the byte-level BPE tokenizer on the train split (seeded, deterministic).

Usage: python scripts/train_tokenizer.py [-o data/tokenizer] [--vocab 4096]
Saves a `PreTrainedTokenizerFast` so `AutoTokenizer.from_pretrained(dir)` loads it.
"""
from __future__ import annotations

import argparse

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from moecore.data import load_split

SPECIAL = ["<|endoftext|>", "<|pad|>"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-o", "--output", default="data/tokenizer")
    ap.add_argument("--vocab", type=int, default=4096)
    args = ap.parse_args()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=args.vocab, special_tokens=SPECIAL, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=True)
    tok.train_from_iterator(load_split("train"), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL[0], eos_token=SPECIAL[0],
                                   unk_token=None, pad_token=SPECIAL[1], model_max_length=1024)
    fast.save_pretrained(args.output)
    print(f"saved tokenizer ({fast.vocab_size} tokens) to {args.output}")


if __name__ == "__main__":
    main()
