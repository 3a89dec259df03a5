#!/usr/bin/env python3
"""Side-by-side timing of DVC and smelt on the data of bench/engine.py.

Builds two DVC projects in a scratch directory outside the repo (default /work/bench-dvc):
  bench/  the 7 stages of engine.py's PIPELINE as a dvc.yaml, same shell commands, each
          stage writing into its own directory out/<stage>/; `data` links to bench/work/data;
  many/   the 1-stage pipeline over the 100,000 small files; `many` links to bench/work/many.
Each is `git init` + `dvc init`, with analytics and update checks off and DVC's state
database (its stat cache) kept inside the project, so a fresh --work starts cold.
The first `dvc repro` (which hashes all ~400 MB) is timed once. Then, for N rounds,
alternating DVC and smelt within each round (smelt runs in bench/work):
  noop:      `dvc repro`          vs `smelt run bench.yaml`   (nothing to rerun)
  status:    `dvc status`         vs `smelt status bench.yaml`
  noop_100k: `dvc repro` in many/ vs `smelt run many.yaml`
Prints JSON: per-tool medians and the median of the per-round ratios dvc/smelt.

usage:
  python3 -m venv /work/venv-dvc && /work/venv-dvc/bin/pip install dvc
  python3 bench/engine.py            # once: creates bench/work data and runs smelt
  python3 bench/dvc_compare.py [--rounds 7] [--work /work/bench-dvc]
                               [--dvc /work/venv-dvc/bin/dvc] [--hardlink] [--fresh]
--hardlink links the data with `cp -al` instead of a symlink; --fresh rebuilds --work.
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
SMELT = str(ROOT / "target" / "release" / "smelt")
BENCH = ROOT / "bench" / "work"

# engine.py's PIPELINE: same commands, $SMELT_OUT -> out/<stage>, inputs -> upstream outs.
DVC_BENCH = """\
stages:
  count:
    cmd: mkdir -p out/count && ls data/shards | wc -l > out/count/count
    deps: [data/shards]
    outs: [out/count]
  checksum:
    cmd: mkdir -p out/checksum && cat data/shards/* | cksum > out/checksum/sum
    deps: [data/shards]
    outs: [out/checksum]
  head:
    cmd: mkdir -p out/head && head -c 1000000 data/big.bin > out/head/head.bin
    deps: [data/big.bin]
    outs: [out/head]
  summary:
    cmd: mkdir -p out/summary && cat out/count/count out/checksum/sum > out/summary/summary
    deps: [out/count, out/checksum]
    outs: [out/summary]
  head_sum:
    cmd: mkdir -p out/head_sum && cksum out/head/head.bin | cut -d' ' -f1 > out/head_sum/sum
    deps: [out/head]
    outs: [out/head_sum]
  report:
    cmd: mkdir -p out/report && cat out/summary/summary out/head_sum/sum > out/report/report
    deps: [out/summary, out/head_sum]
    outs: [out/report]
  publish:
    cmd: mkdir -p out/publish && cp out/report/report out/publish/report.txt
    deps: [out/report]
    outs: [out/publish]
"""

DVC_MANY = """\
stages:
  list:
    cmd: mkdir -p out/list && ls many | wc -l > out/list/n
    deps: [many]
    outs: [out/list]
"""

ENV = dict(os.environ, DVC_NO_ANALYTICS="1")


def sh(cmd, cwd):
    """Run cmd (a list), fail loudly, return its stdout."""
    p = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed in {cwd}:\n{p.stdout}{p.stderr}")
    return p.stdout


def timed(cmd, cwd):
    start = time.perf_counter()
    sh(cmd, cwd)
    return time.perf_counter() - start


def setup(project, dvc, dvc_yaml, links, hardlink):
    """git init + dvc init in `project`, link in the data, write dvc.yaml."""
    project.mkdir(parents=True)
    sh(["git", "init", "-q"], project)
    sh([dvc, "init", "-q"], project)
    for key, value in [("core.analytics", "false"), ("core.check_update", "false"),
                       ("core.site_cache_dir", str(project / ".dvc" / "site"))]:
        sh([dvc, "config", key, value], project)
    for name in links:
        if hardlink:
            sh(["cp", "-al", str(BENCH / name), name], project)
        else:
            (project / name).symlink_to(BENCH / name)
    (project / "dvc.yaml").write_text(dvc_yaml)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--work", type=Path, default=Path("/work/bench-dvc"))
    parser.add_argument("--dvc", default="/work/venv-dvc/bin/dvc")
    parser.add_argument("--hardlink", action="store_true", help="cp -al the data instead of symlinking it")
    parser.add_argument("--fresh", action="store_true", help="delete --work and rebuild the DVC projects")
    args = parser.parse_args()
    if not (BENCH / "bench.yaml").exists() or not (BENCH / "many").is_dir():
        sys.exit("run bench/engine.py first: it creates bench/work")
    work = args.work.resolve()
    if work.is_relative_to(ROOT):
        sys.exit("--work must be outside the repo")
    dvc = args.dvc
    results = {"dvc_version": sh([dvc, "--version"], "/").strip(),
               "smelt_version": sh([SMELT, "--version"], "/").strip(),
               "data_link": "hardlink" if args.hardlink else "symlink"}

    if args.fresh:
        shutil.rmtree(work, ignore_errors=True)
    bench, many = work / "bench", work / "many"
    if not bench.exists():
        setup(bench, dvc, DVC_BENCH, ["data"], args.hardlink)
        setup(many, dvc, DVC_MANY, ["many"], args.hardlink)
        # Warm the page cache, as engine.py does, so the first repro measures hashing, not disk.
        subprocess.run("cat data/shards/* data/big.bin > /dev/null", shell=True, cwd=BENCH, check=True)
        results["first_repro_s"] = timed([dvc, "repro"], bench)  # hashes ~400 MB, runs 7 stages
        results["first_repro_100k_s"] = timed([dvc, "repro"], many)

    # Both sides must be true no-ops before timing.
    sh([SMELT, "run", "bench.yaml"], BENCH)
    sh([SMELT, "run", "many.yaml"], BENCH)
    for project in [bench, many]:
        out = sh([dvc, "repro"], project)
        assert "up to date" in out, out
    assert "0 ran" in sh([SMELT, "run", "bench.yaml"], BENCH)
    assert "0 ran" in sh([SMELT, "run", "many.yaml"], BENCH)

    pairs = {
        "noop": (([dvc, "repro"], bench), ([SMELT, "run", "bench.yaml"], BENCH)),
        "status": (([dvc, "status"], bench), ([SMELT, "status", "bench.yaml"], BENCH)),
        "noop_100k": (([dvc, "repro"], many), ([SMELT, "run", "many.yaml"], BENCH)),
    }
    times = {name: {"dvc": [], "smelt": []} for name in pairs}
    for _ in range(args.rounds):
        for name, (dvc_cmd, smelt_cmd) in pairs.items():
            times[name]["dvc"].append(timed(*dvc_cmd))
            times[name]["smelt"].append(timed(*smelt_cmd))
    results["rounds"] = args.rounds
    for name, t in times.items():
        results[name] = {
            "dvc_s": statistics.median(t["dvc"]),
            "smelt_s": statistics.median(t["smelt"]),
            "ratio_dvc_over_smelt": statistics.median(d / s for d, s in zip(t["dvc"], t["smelt"])),
        }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
