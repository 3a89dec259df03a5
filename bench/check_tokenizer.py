#!/usr/bin/env python3
"""Checks a `tokenize` artifact with the Python libraries users will load it with.

For the first --documents records of each stream of the artifact (text, chat, preference):
- `tokenizers.Tokenizer.from_file(tokenizer.json)` gives the ids in the shards;
- `transformers.AutoTokenizer.from_pretrained(dir)` loads it as a PreTrainedTokenizerFast with
  the same ids, and its `apply_chat_template` renders a conversation to the ids of the chat
  stream (the template comes from tokenizer_config.json).
Prints one JSON object with the counts checked; exits non-zero on the first mismatch.

usage: /work/venv-tok/bin/python bench/check_tokenizer.py TOKENS_DIR CORPUS_DIR [--documents N]
  (venv: pip install tokenizers transformers)
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer
from transformers import AutoTokenizer


def read_stream(directory, stream, dtype):
    sequences = []
    for shard in stream["shards"]:
        ids = np.fromfile(directory / shard["tokens"], dtype=np.uint16 if dtype == "u16" else np.uint32)
        offsets = np.fromfile(directory / shard["index"], dtype=np.uint64)
        mask = np.fromfile(directory / shard["mask"], dtype=np.uint8) if shard.get("mask") else None
        for start, end in zip(offsets[:-1], offsets[1:]):
            sequences.append((ids[start:end].tolist(), None if mask is None else mask[start:end].tolist()))
    return sequences


def records(corpus, split):
    for shard in sorted(corpus.glob(f"{split}-*.jsonl")):
        for line in open(shard):
            yield json.loads(line)


def fail(message):
    print(message, file=sys.stderr)
    sys.exit(1)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("tokens", type=Path)
    parser.add_argument("corpus", type=Path)
    parser.add_argument("--documents", type=int, default=200)
    args = parser.parse_args()
    meta = json.loads((args.tokens / "meta.json").read_text())
    raw = Tokenizer.from_file(str(args.tokens / "tokenizer.json"))
    fast = AutoTokenizer.from_pretrained(str(args.tokens))
    checked = {"tokenizer_class": type(fast).__name__}
    eos = meta["eos_id"]
    text = [r for r in records(args.corpus, "train") if "messages" not in r and "chosen" not in r]
    if "train" in meta["streams"]:
        sequences = read_stream(args.tokens, meta["streams"]["train"], meta["dtype"])
        for record, (ids, _) in list(zip(text, sequences))[: args.documents]:
            expected = raw.encode(record["text"], add_special_tokens=False).ids + [eos]
            if ids != expected:
                fail(f"text {record['id']}: shards {ids[:20]}… tokenizers {expected[:20]}…")
            if fast(record["text"], add_special_tokens=False)["input_ids"] + [eos] != ids:
                fail(f"text {record['id']}: transformers disagrees")
            if raw.decode(ids[:-1], skip_special_tokens=False) != record["text"] and meta["stats"]["encoder"] == "byte_level_bpe":
                fail(f"text {record['id']}: decode does not round-trip")
        checked["text_documents"] = min(len(sequences), args.documents)
    chats = [r for r in records(args.corpus, "train") if "messages" in r]
    if "chat-train" in meta["streams"]:
        sequences = read_stream(args.tokens, meta["streams"]["chat-train"], meta["dtype"])
        for record, (ids, mask) in list(zip(chats, sequences))[: args.documents]:
            rendered = fast.apply_chat_template(record["messages"], tokenize=False)
            expected = raw.encode(rendered, add_special_tokens=False).ids
            if ids != expected:
                fail(f"chat {record['id']}: shards {ids[:30]}… apply_chat_template {expected[:30]}…")
            answer = [i for i, m in zip(ids, mask) if m == 1]
            last = record["messages"][-1]["content"]
            if not raw.decode(answer, skip_special_tokens=True).startswith(last.strip()[:10]):
                fail(f"chat {record['id']}: the mask does not cover the answer")
        checked["conversations"] = min(len(sequences), args.documents)
    print(json.dumps(checked))


if __name__ == "__main__":
    main()
