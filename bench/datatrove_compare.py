#!/usr/bin/env python3
"""datatrove on the `clean` benchmark corpus, for speed ratios against bench/clean_bench.py.

Runs the same three jobs as clean_bench.py with datatrove's LocalPipelineExecutor (2 tasks on 2
workers unless a stage needs otherwise), each reading the corpus with JsonlReader and writing the
kept documents with an uncompressed JsonlWriter:
  filters  GopherRepetitionFilter + GopherQualityFilter (defaults, language "en")
  exact    whole-document exact dedup: ExactDedupSignature -> ExactFindDedups -> ExactDedupFilter
           (xxhash64 of the full text; the first document of a hash is kept)
  minhash  MinhashDedupSignature -> MinhashDedupBuckets -> MinhashDedupCluster -> MinhashDedupFilter
           with MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8)
Each stage's wall clock is time.perf_counter() around executor.run() (process pool start-up,
reading and writing included); a job's time is the sum of its stages. Reported per job: seconds,
docs/s and MB/s (input JSONL bytes / 1e6). For MinHash, the recall of the injected pairs of
truth.json whose two documents are both in the input (a pair counts as caught when either side is
removed, as in clean_bench.py), and the precision of the removals.

datatrove is slow, so by default only the first N documents of the corpus (corpus-0.jsonl then
corpus-1.jsonl, which are shuffled) are used, written as two JSONL files so that both tasks have
work. --documents 0 runs on the full corpus files in place.

setup (outside the repository; English word splitting uses spacy.blank("en"), no data download):
  python3 -m venv /work/venv-datatrove
  /work/venv-datatrove/bin/pip install "datatrove[processing]" spacy orjson
usage:
  /work/venv-datatrove/bin/python bench/datatrove_compare.py [--documents N] [--scratch DIR]
      [--jobs filters,exact,minhash]
"""

import argparse
import importlib.metadata
import itertools
import json
import shutil
import time
from pathlib import Path

from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.dedup import (
    ExactDedupConfig,
    ExactDedupFilter,
    ExactDedupSignature,
    ExactFindDedups,
    MinhashConfig,
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
    MinhashDedupSignature,
)
from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "bench" / "work" / "clean"
TASKS = WORKERS = 2


def document_text(doc) -> str:
    # ExactDedupSignature picks its hash function from this return annotation.
    return doc.text


def prepare_input(corpus: Path, input_dir: Path, documents: int) -> tuple[Path, int, int]:
    """Writes the first `documents` lines of the corpus as two files; returns (folder, docs, bytes)."""
    sources = sorted(corpus.glob("corpus-*.jsonl"))
    if documents <= 0:
        count = sum(1 for s in sources for _ in open(s))
        return corpus, count, sum(s.stat().st_size for s in sources)
    shutil.rmtree(input_dir, ignore_errors=True)
    input_dir.mkdir(parents=True)
    lines = []
    for source in sources:
        with open(source) as f:
            lines.extend(itertools.islice(f, documents - len(lines)))
    half = (len(lines) + 1) // 2
    for part, chunk in enumerate([lines[:half], lines[half:]]):
        (input_dir / f"corpus-{part}.jsonl").write_text("".join(chunk))
    return input_dir, len(lines), sum(len(line.encode()) for line in lines)


def reader(input_dir: Path):
    return JsonlReader(str(input_dir), glob_pattern="corpus-*.jsonl")


def writer(out: Path):
    return JsonlWriter(str(out / "output"), compression=None)


def run_stages(work: Path, stages: list[tuple[str, list, int]]) -> dict:
    """Runs (name, pipeline, tasks) stages in order; returns the seconds of each and their total."""
    shutil.rmtree(work, ignore_errors=True)  # completed tasks in old logs would be skipped
    times = {}
    for name, pipeline, tasks in stages:
        executor = LocalPipelineExecutor(
            pipeline=pipeline, tasks=tasks, workers=min(WORKERS, tasks), logging_dir=str(work / "logs" / name)
        )
        start = time.perf_counter()
        executor.run()
        times[name] = round(time.perf_counter() - start, 2)
    return {"seconds": round(sum(times.values()), 2), "stage_seconds": times}


def filters_job(input_dir: Path, work: Path) -> dict:
    pipeline = [reader(input_dir), GopherRepetitionFilter(), GopherQualityFilter(), writer(work)]
    result = run_stages(work, [("filters", pipeline, TASKS)])
    # Why documents were dropped, from datatrove's merged stats (e.g. "dropped_top_4_gram").
    stats = json.loads((work / "logs" / "filters" / "stats.json").read_text())
    result["dropped"] = {k: v for step in stats for k, v in step["stats"].items() if k.startswith("dropped_")}
    return result


def exact_job(input_dir: Path, work: Path) -> dict:
    config = ExactDedupConfig(content_getter=document_text)
    sigs, dups = str(work / "signatures"), str(work / "duplicates")
    return run_stages(work, [
        ("signature", [reader(input_dir), ExactDedupSignature(sigs, config=config, finder_workers=1)], TASKS),
        ("find", [ExactFindDedups(sigs, dups, config=config)], 1),
        ("filter", [reader(input_dir), ExactDedupFilter(dups, config=config), writer(work)], TASKS),
    ])


def minhash_job(input_dir: Path, work: Path) -> dict:
    config = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8)
    sigs, buckets, remove = str(work / "signatures"), str(work / "buckets"), str(work / "remove_ids")
    return run_stages(work, [
        ("signature", [reader(input_dir), MinhashDedupSignature(sigs, config=config)], TASKS),
        # MinhashDedupBuckets needs a multiple of num_buckets tasks (one hash range per task).
        ("buckets", [MinhashDedupBuckets(sigs, buckets, config=config)], config.num_buckets),
        ("cluster", [MinhashDedupCluster(buckets, remove, config=config)], 1),
        ("filter", [reader(input_dir), MinhashDedupFilter(remove), writer(work)], TASKS),
    ])


def read_ids(folder: Path) -> set:
    return {json.loads(line)["id"] for f in folder.glob("*.jsonl") for line in open(f)}


def minhash_quality(input_dir: Path, output: Path, truth: dict) -> dict:
    all_ids, kept = read_ids(input_dir), read_ids(output)
    removed = all_ids - kept
    result = {}
    injected = set()
    for kind, pairs in truth.items():
        present = [(c, o) for c, o in pairs if c in all_ids and o in all_ids]
        injected.update(doc for pair in present for doc in pair)
        caught = sum(1 for c, o in present if c in removed or o in removed)
        result[f"minhash_recall_{kind}"] = round(caught / len(present), 4) if present else None
        result[f"minhash_pairs_{kind}"] = len(present)
    result["minhash_precision"] = round(len(removed & injected) / max(1, len(removed)), 4)
    result["minhash_removed"] = len(removed)
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--documents", type=int, default=20_000, help="first N documents; 0 for all")
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    parser.add_argument("--scratch", type=Path, default=Path("/work/bench-datatrove"))
    parser.add_argument("--jobs", default="filters,exact,minhash")
    args = parser.parse_args()
    input_dir, documents, size = prepare_input(args.corpus, args.scratch / "input", args.documents)
    megabytes = size / 1e6
    results = {"datatrove": importlib.metadata.version("datatrove"),
               "documents": documents, "megabytes": round(megabytes, 1), "tasks": TASKS, "workers": WORKERS}
    jobs = {"filters": filters_job, "exact": exact_job, "minhash": minhash_job}
    for name in args.jobs.split(","):
        work = args.scratch / name
        result = jobs[name](input_dir, work)
        t = result["seconds"]
        result |= {"docs_per_s": round(documents / t), "mb_per_s": round(megabytes / t, 2),
                   "kept": len(read_ids(work / "output"))}
        results[name] = result
    if "minhash" in args.jobs.split(","):
        truth = json.loads((args.corpus / "truth.json").read_text())
        results |= minhash_quality(input_dir, args.scratch / "minhash" / "output", truth)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
