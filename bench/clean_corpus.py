#!/usr/bin/env python3
"""Builds the `clean` benchmark corpus from tinyshakespeare: ~200,000 documents (~164 MB) in two
JSONL files, with injected exact copies and near copies (2 or 4 words changed in ~100), and a
ground-truth file listing the injected copies as [copy id, original id] pairs.

Documents are windows of 70 to 230 words at random offsets of the text; each window is prefixed
with a random document number so that windows of the same place are not accidental duplicates.
Windows of a 1 MB text overlap heavily, so most originals are near copies of each other. With
--distinct, documents are instead words drawn at random from the text (no natural overlap), which
measures the recall and precision of near-duplicate detection on the injected copies alone.

usage: python3 bench/clean_corpus.py [--out DIR] [--documents N] [--shakespeare PATH]
writes DIR/corpus-0.jsonl, DIR/corpus-1.jsonl, DIR/truth.json
"""

import argparse
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "work" / "clean")
    parser.add_argument("--documents", type=int, default=200_000)
    parser.add_argument("--shakespeare", type=Path, default=ROOT.parent / "shared" / "data" / "tinyshakespeare.txt")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--distinct", action="store_true")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    words = args.shakespeare.read_text().split()
    args.out.mkdir(parents=True, exist_ok=True)
    # 90% originals, then 4% exact copies, 3% near copies with 2 words changed, 3% with 4.
    n = args.documents
    originals = int(n * 0.90)
    docs = []
    for i in range(originals):
        length = rng.randint(70, 230)
        if args.distinct:
            body = " ".join(rng.choice(words) for _ in range(length))
        else:
            start = rng.randrange(0, len(words) - length)
            body = " ".join(words[start:start + length])
        docs.append({"id": f"doc{i}", "text": f"Document {rng.randrange(10**9)}.\n{body}"})
    truth = {"exact": [], "near2": [], "near4": []}
    kinds = ["exact"] * int(n * 0.04) + ["near2"] * int(n * 0.03) + ["near4"] * int(n * 0.03)
    for j, kind in enumerate(kinds):
        source = docs[rng.randrange(originals)]
        text = source["text"]
        if kind != "exact":
            tokens = text.split(" ")
            for _ in range(2 if kind == "near2" else 4):
                tokens[rng.randrange(1, len(tokens))] = rng.choice(words)
            text = " ".join(tokens)
        copy_id = f"copy{j}"
        docs.append({"id": copy_id, "text": text})
        truth[kind].append([copy_id, source["id"]])
    rng.shuffle(docs)
    half = len(docs) // 2
    for part, chunk in enumerate([docs[:half], docs[half:]]):
        with open(args.out / f"corpus-{part}.jsonl", "w") as f:
            for d in chunk:
                f.write(json.dumps(d) + "\n")
    (args.out / "truth.json").write_text(json.dumps(truth))
    size = sum((args.out / f"corpus-{p}.jsonl").stat().st_size for p in (0, 1))
    print(json.dumps({"documents": len(docs), "bytes": size, **{k: len(v) for k, v in truth.items()}}))


if __name__ == "__main__":
    main()
