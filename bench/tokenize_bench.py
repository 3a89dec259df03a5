#!/usr/bin/env python3
"""`tokenize` speed against Python `tokenizers` and tiktoken, run alternately in one window.

Corpus: ../shared/data/tinyshakespeare.txt cut into ~1 KB documents (whole lines) and repeated
to --megabytes (default 100), as JSONL. Each round, for 1 and 2 threads:
- smelt: a `tokenize` stage (byte-level BPE, vocab 4096) forced to rerun; its metrics give the
  training time and the encoding time (reading JSONL, encoding, writing shards);
- tokenizers: the same vocabulary trained with `train_from_iterator` (ByteLevel pre-tokenizer,
  BpeTrainer, byte alphabet), then `encode_batch` over the documents in memory;
- tiktoken: `encode_ordinary_batch` with GPT-2's split pattern and the vocabulary tokenizers
  trained (GPT-2's own file cannot be downloaded here); same tokens, its own BPE code.
Thread counts: RAYON_NUM_THREADS for smelt and tokenizers (which may not honour it: its
1-thread runs were seen using 1.9 cores), num_threads
for tiktoken. Reports the median over --rounds of each figure, and whether smelt's vocabulary
equals the one tokenizers trains.

usage: cargo build --release && /work/venv-tok/bin/python bench/tokenize_bench.py [--rounds N]
  (venv: pip install tokenizers tiktoken)
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMELT = str(ROOT / "target" / "release" / "smelt")
WORK = ROOT / "bench" / "work" / "tokenize"
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

PIPELINE = """\
smelt: 1
name: tokenize-bench
stages:
  corpus:
    uses: collect
    with: { sources: [ { files: { glob: "corpus-*.jsonl" } } ], split: { validation: 0.0 } }
  tokens:
    uses: tokenize
    inputs: { corpus: corpus }
    with: { train: { model: byte_level_bpe, vocab_size: 4096 } }
"""

# Run in a child process so that each thread count gets a fresh rayon pool.
PYTHON_SIDE = r"""
import json, sys, time
import tiktoken
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

threads, pattern, paths = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
texts = [json.loads(line)["text"] for path in paths for line in open(path)]
tokenizer = Tokenizer(models.BPE())
tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tokenizer.decoder = decoders.ByteLevel()
trainer = trainers.BpeTrainer(
    vocab_size=4096, show_progress=False,
    special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
start = time.perf_counter()
tokenizer.train_from_iterator(texts, trainer)
train = time.perf_counter() - start
start = time.perf_counter()
encoded = tokenizer.encode_batch(texts, add_special_tokens=False)
encode = time.perf_counter() - start
tokens = sum(len(e.ids) for e in encoded)

# tiktoken with the same vocabulary: token bytes ranked by id (ids follow merge order).
printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
extra = iter(range(256, 512))
byte_of = {(chr(b) if b in printable else chr(next(extra))): b for b in range(256)}
ranks = {bytes(byte_of[c] for c in token): rank
         for token, rank in tokenizer.get_vocab().items() if not token.startswith("<|")}
encoding = tiktoken.Encoding("bench", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
start = time.perf_counter()
tik = encoding.encode_ordinary_batch(texts, num_threads=threads)
tiktoken_s = time.perf_counter() - start
print(json.dumps({
    "train_s": train, "encode_s": encode, "tokens": tokens,
    "tiktoken_s": tiktoken_s, "tiktoken_tokens": sum(map(len, tik)),
    "vocab": tokenizer.to_str(),
}))
"""


def make_corpus(megabytes):
    WORK.mkdir(parents=True, exist_ok=True)
    if (WORK / "corpus-1.jsonl").exists():
        return
    lines = SHAKESPEARE.read_text().splitlines(keepends=True)
    documents, current = [], ""
    for line in lines:
        current += line
        if len(current) >= 1000:
            documents.append(current.strip("\n"))
            current = ""
    target = megabytes * 1_000_000
    written, copy = 0, 0
    files = [open(WORK / f"corpus-{i}.jsonl", "w") for i in range(2)]
    while written < target:
        for i, text in enumerate(documents):
            files[(copy + i) % 2].write(json.dumps({"id": f"c{copy}d{i}", "text": text}) + "\n")
            written += len(text.encode())
        copy += 1
    for f in files:
        f.close()


def smelt(*args, threads):
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    return subprocess.run([SMELT, *args], cwd=WORK, env=env, check=True, capture_output=True, text=True).stdout


def smelt_round(threads):
    smelt("run", "bench.yaml", "--only", "tokens", "--force", "tokens", threads=threads)
    path = Path(smelt("show", "bench.yaml", "tokens", "--path", threads=threads).strip())
    meta = json.loads((path / "meta.json").read_text())
    stats = meta["stats"]
    # Without the end-of-text token after each document, to count as tokenizers does.
    tokens = sum(s["tokens"] for s in meta["streams"].values()) - stats["documents"]
    vocab = json.loads((path / "tokenizer.json").read_text())["model"]
    return {"train_s": stats["train_seconds"], "encode_s": stats["encode_seconds"], "tokens": tokens, "vocab": vocab}


def python_round(threads):
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads), RAYON_RS_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="true")
    paths = [str(p) for p in sorted(WORK.glob("corpus-*.jsonl"))]
    out = subprocess.run([sys.executable, "-c", PYTHON_SIDE, str(threads), GPT2_PATTERN, *paths],
                         env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--megabytes", type=int, default=100)
    args = parser.parse_args()
    make_corpus(args.megabytes)
    (WORK / "bench.yaml").write_text(PIPELINE)
    smelt("run", "bench.yaml", "--only", "corpus", threads=2)
    megabytes = sum(p.stat().st_size for p in WORK.glob("corpus-*.jsonl")) / 1e6
    samples = {}
    vocab_equal = None
    for _ in range(args.rounds):
        for threads in (1, 2):
            s = smelt_round(threads)
            p = python_round(threads)
            for name, value in [
                ("smelt_train_s", s["train_s"]),
                ("smelt_encode_s", s["encode_s"]),
                ("smelt_tokens_per_s", s["tokens"] / s["encode_s"]),
                ("tokenizers_train_s", p["train_s"]),
                ("tokenizers_encode_s", p["encode_s"]),
                ("tokenizers_tokens_per_s", p["tokens"] / p["encode_s"]),
                ("tiktoken_tokens_per_s", p["tiktoken_tokens"] / p["tiktoken_s"]),
            ]:
                samples.setdefault(f"{name}@{threads}", []).append(value)
            theirs = json.loads(p["vocab"])["model"]
            vocab_equal = s["vocab"]["vocab"] == theirs["vocab"] and s["vocab"]["merges"] == theirs["merges"]
            samples.setdefault("tokens_smelt", []).append(s["tokens"])
            samples.setdefault("tokens_tokenizers", []).append(p["tokens"])
            samples.setdefault("tokens_tiktoken", []).append(p["tiktoken_tokens"])
    result = {"megabytes": round(megabytes, 1), "rounds": args.rounds, "same_vocabulary": vocab_equal}
    for name, values in samples.items():
        result[name] = round(statistics.median(values), 3 if "_s@" in name else 0)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
