#!/usr/bin/env python3
"""`clean` throughput and dedup quality on the corpus of bench/clean_corpus.py.

Runs one pipeline with a `collect` stage and three `clean` stages measured separately, as in
datatrove's figures: the Gopher repetition + quality filters, exact dedup, MinHash dedup. Each
clean stage is forced to rerun `--rounds` times; its run time is the stage duration smelt records
(reading and writing shards included), measured cold (no scores memo). `filters_rethreshold` is
the same stage after only a threshold changed, replaying the memoised scores.

With --recall, it instead builds a corpus of random words (--recall-documents, default 100,000;
no natural overlap, see clean_corpus.py --distinct) and reports the MinHash stage's recall per
kind of injected copy, and its precision (the share of removed documents that belong to an
injected pair). A pair counts as caught when either document is removed (the first in corpus
order is kept).

usage: cargo build --release && python3 bench/clean_bench.py [--rounds N] [--recall]
"""

import argparse
import json
import shutil
import statistics
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMELT = str(ROOT / "target" / "release" / "smelt")
WORK = ROOT / "bench" / "work"

PIPELINE = """\
smelt: 1
name: clean-bench
stages:
  corpus:
    uses: collect
    with: { sources: [ { files: { glob: "clean/corpus-*.jsonl" } } ] }
  filters:
    uses: clean
    inputs: { corpus: corpus }
    with: { filters: [ { gopher_repetition: {} }, { gopher_quality: {} } ], dedup: { exact: false } }
  exact:
    uses: clean
    inputs: { corpus: corpus }
    with: { dedup: { exact: true } }
  minhash:
    uses: clean
    inputs: { corpus: corpus }
    with: { dedup: { exact: false, minhash: { threshold: 0.8, shingle: 5, permutations: 112 } } }
"""


def smelt(*args):
    return subprocess.run([SMELT, *args], cwd=WORK, check=True, capture_output=True, text=True).stdout


def duration(stage, *extra):
    for line in smelt("show", "clean.yaml", stage, *extra).splitlines():
        if line.startswith("duration:"):
            return float(line.split()[1].rstrip("s"))
    raise RuntimeError("no duration")


def output_ids(stage):
    path = Path(smelt("show", "clean.yaml", stage, "--path").strip())
    ids = set()
    for shard in sorted(path.glob("*.jsonl")):
        for line in shard.read_text().splitlines():
            ids.add(json.loads(line)["id"])
    return ids


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--recall", action="store_true")
    parser.add_argument("--recall-documents", type=int, default=100_000)
    args = parser.parse_args()
    corpus_dir = "clean-distinct" if args.recall else "clean"
    if not (WORK / corpus_dir / "truth.json").exists():
        extra = ["--distinct", "--documents", str(args.recall_documents)] if args.recall else []
        subprocess.run(["python3", str(ROOT / "bench" / "clean_corpus.py"), "--out", str(WORK / corpus_dir), *extra], check=True)
    (WORK / "clean.yaml").write_text(PIPELINE.replace("clean/corpus-", f"{corpus_dir}/corpus-"))
    smelt("run", "clean.yaml", "--only", "corpus")
    corpus = Path(smelt("show", "clean.yaml", "corpus", "--path").strip())
    documents = sum(1 for s in corpus.glob("*.jsonl") for _ in open(s))
    megabytes = sum(s.stat().st_size for s in corpus.glob("*.jsonl")) / 1e6
    results = {"documents": documents, "megabytes": round(megabytes, 1)}
    def timed(stage, *extra, cold=True):
        times = []
        for _ in range(args.rounds):
            if cold:  # no scores memo from an earlier round
                shutil.rmtree(WORK / ".smelt" / "memo", ignore_errors=True)
            smelt("run", "clean.yaml", "--only", stage, "--force", stage, *extra)
            times.append(duration(stage, *extra))
        t = statistics.median(times)
        return {"seconds": round(t, 2), "docs_per_s": round(documents / t), "mb_per_s": round(megabytes / t, 1)}

    for stage in ["minhash"] if args.recall else ["filters", "exact", "minhash"]:
        results[stage] = timed(stage)
    if not args.recall:
        # Tag once, re-threshold for free: only a threshold changes, the scores are replayed.
        smelt("run", "clean.yaml", "--only", "filters")
        results["filters_rethreshold"] = timed("filters", "--set", "stages.filters.with.filters.1.gopher_quality.min_words=60", cold=False)
    truth = json.loads((WORK / corpus_dir / "truth.json").read_text())
    kept = output_ids("minhash")
    # A pair is caught when either side is gone: the first in corpus order is the one kept.
    injected = {doc for pairs in truth.values() for pair in pairs for doc in pair}
    for kind, pairs in truth.items():
        caught = sum(1 for copy, original in pairs if copy not in kept or original not in kept)
        results[f"minhash_recall_{kind}"] = round(caught / len(pairs), 4)
    all_ids = {json.loads(l)["id"] for s in corpus.glob("*.jsonl") for l in open(s)}
    removed = all_ids - kept
    results["minhash_precision"] = round(len(removed & injected) / max(1, len(removed)), 4)
    results["minhash_removed"] = len(removed)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
