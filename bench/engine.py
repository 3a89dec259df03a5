#!/usr/bin/env python3
"""Engine overhead benchmark: a 7-stage `command` pipeline over 3,000 input files (~400 MB).

Measures, with the release binary:
  - first run vs. the same commands run bare (the overhead smelt adds: hashing, publishing);
  - no-op rerun, `smelt status`, and `smelt plan` on an unchanged project;
  - an mtime-only touch of the 100 MB input (rehashed, nothing rerun);
  - hashing throughput (plan on a cold stat cache, 1 thread and all threads);
  - the no-op with 100,000 small input files.
Each timing is the median of several runs, interleaved with a `true` baseline process spawn.

usage: cargo build --release && python3 bench/engine.py [--rounds N] [--work DIR]
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMELT = ROOT / "target" / "release" / "smelt"

PIPELINE = """\
# yaml-language-server: $schema=../../schemas/pipeline.schema.json
smelt: 1
name: bench
stages:
  count:
    uses: command
    with: { run: "ls data/shards | wc -l > $SMELT_OUT/count", deps: [data/shards] }
  checksum:
    uses: command
    with: { run: "cat data/shards/* | cksum > $SMELT_OUT/sum", deps: [data/shards] }
  head:
    uses: command
    with: { run: "head -c 1000000 data/big.bin > $SMELT_OUT/head.bin", deps: [data/big.bin] }
  summary:
    uses: command
    inputs: { count: count, sum: checksum }
    with: { run: "cat $SMELT_IN_COUNT/count $SMELT_IN_SUM/sum > $SMELT_OUT/summary" }
  head_sum:
    uses: command
    inputs: { head: head }
    with: { run: "cksum $SMELT_IN_HEAD/head.bin | cut -d' ' -f1 > $SMELT_OUT/sum" }
  report:
    uses: command
    inputs: { summary: summary, head: head_sum }
    with: { run: "cat $SMELT_IN_SUMMARY/summary $SMELT_IN_HEAD/sum > $SMELT_OUT/report" }
  publish:
    uses: command
    inputs: { report: report }
    with: { run: "cp $SMELT_IN_REPORT/report $SMELT_OUT/report.txt" }
"""

MANY = """\
smelt: 1
name: many
stages:
  list:
    uses: command
    with: { run: "ls many | wc -l > $SMELT_OUT/n", deps: [many] }
"""


def sh(cmd, cwd, env=None):
    subprocess.run(cmd, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, shell=isinstance(cmd, str))


def timed(cmd, cwd, env=None):
    start = time.perf_counter()
    sh(cmd, cwd, env)
    return time.perf_counter() - start


def median_time(cmd, cwd, rounds, env=None, before=None):
    """Median wall time of `cmd`, alternating with a bare `true` spawn; returns (cmd, true)."""
    ours, base = [], []
    for _ in range(rounds):
        if before:
            before()
        ours.append(timed(cmd, cwd, env))
        base.append(timed(["true"], cwd))
    return statistics.median(ours), statistics.median(base)


def make_data(work):
    data = work / "data"
    if (data / "done").exists():
        return
    shards = data / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    rng = open("/dev/urandom", "rb")
    for i in range(2999):
        (shards / f"shard_{i:04}.bin").write_bytes(rng.read(100_000))
    (data / "big.bin").write_bytes(rng.read(100 * 1024 * 1024))
    many = work / "many"
    many.mkdir(exist_ok=True)
    for i in range(100_000):
        (many / f"f{i:06}.txt").write_text(f"file {i}\n")
    (data / "done").write_text("")


def bare_commands(work):
    """The seven commands without smelt, each writing into its own directory."""
    out = work / "bare"
    shutil.rmtree(out, ignore_errors=True)
    dirs = {name: out / name for name in ["count", "checksum", "head", "summary", "head_sum", "report", "publish"]}
    for d in dirs.values():
        d.mkdir(parents=True)
    d = {k: str(v) for k, v in dirs.items()}
    return " && ".join([
        f"ls data/shards | wc -l > {d['count']}/count",
        f"cat data/shards/* | cksum > {d['checksum']}/sum",
        f"head -c 1000000 data/big.bin > {d['head']}/head.bin",
        f"cat {d['count']}/count {d['checksum']}/sum > {d['summary']}/summary",
        f"cksum {d['head']}/head.bin | cut -d' ' -f1 > {d['head_sum']}/sum",
        f"cat {d['summary']}/summary {d['head_sum']}/sum > {d['report']}/report",
        f"cp {d['report']}/report {d['publish']}/report.txt",
    ])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "work")
    args = parser.parse_args()
    if not SMELT.exists():
        sys.exit("build first: cargo build --release")
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    make_data(work)
    (work / "bench.yaml").write_text(PIPELINE)
    (work / "many.yaml").write_text(MANY)
    smelt = str(SMELT)
    results = {}

    def fresh_store():
        shutil.rmtree(work / ".smelt", ignore_errors=True)
        for lock in ["bench.lock", "many.lock"]:
            (work / lock).unlink(missing_ok=True)

    # Warm the page cache so first-run and bare see the same I/O.
    sh("cat data/shards/* data/big.bin > /dev/null", work)
    first, bare = [], []
    for _ in range(max(3, args.rounds // 5)):
        fresh_store()
        first.append(timed([smelt, "run", "bench.yaml"], work))
        bare.append(timed(bare_commands(work), work))
    results["first_run_s"] = statistics.median(first)
    results["bare_commands_s"] = statistics.median(bare)
    results["first_run_overhead_s"] = results["first_run_s"] - results["bare_commands_s"]

    sh([smelt, "run", "bench.yaml"], work)
    results["noop_run_s"], results["spawn_true_s"] = median_time([smelt, "run", "bench.yaml"], work, args.rounds)
    results["status_s"], _ = median_time([smelt, "status", "bench.yaml"], work, args.rounds)
    results["plan_s"], _ = median_time([smelt, "plan", "bench.yaml"], work, args.rounds)

    def touch_big():
        os.utime(work / "data" / "big.bin")
    results["touch_100mb_run_s"], _ = median_time([smelt, "run", "bench.yaml"], work, args.rounds, before=touch_big)
    out = subprocess.run([smelt, "run", "bench.yaml"], cwd=work, capture_output=True, text=True).stdout
    assert "0 ran" in out, out

    size = sum(p.stat().st_size for p in (work / "data").rglob("*.bin"))
    for threads in ["1", str(os.cpu_count())]:
        env = dict(os.environ, RAYON_NUM_THREADS=threads)
        def cold():
            shutil.rmtree(work / ".smelt" / "statcache", ignore_errors=True)
        t, _ = median_time([smelt, "plan", "bench.yaml"], work, max(3, args.rounds // 3), env=env, before=cold)
        # Two stages read data/shards; it is hashed once per process (memoized).
        results[f"cold_plan_{threads}_threads_s"] = t
        results[f"hash_gb_per_s_{threads}_threads"] = size / t / 1e9

    sh([smelt, "run", "many.yaml"], work)
    results["noop_100k_files_s"], _ = median_time([smelt, "run", "many.yaml"], work, args.rounds)
    results["input_bytes"] = size
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
