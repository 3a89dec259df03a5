#!/usr/bin/env python3
"""Kill-anywhere soak: `smelt run` killed with SIGKILL at random moments, then run to the end,
must give the artifacts an uninterrupted run gives, and leave nothing half-done behind.

    bench/kill-soak.py                                   # the quickstart, 20 kills, target/release/smelt
    bench/kill-soak.py -n 50 --pipeline pipelines/corpus.yaml --smelt target/debug/smelt

It builds nothing. In a fresh temporary folder it copies the pipeline's folder (its file and the
data next to it, no store, lockfile or report) twice:
  A: one uninterrupted run, timed; its lockfile gives every stage's artifact id;
  B: N runs, each killed with SIGKILL after a delay drawn uniformly from [0, the time A took]
     (a run that ends first is counted, not killed), then one run to completion.
Then it checks, in B: every stage's artifact id equals A's; the store's tmp/ and work/ are
empty and no temp file of an atomic write (`.NAME.PID.N.tmp`) is left anywhere; `smelt verify`
finds every artifact intact. Prints N, what happened, and PASS or FAIL (exit status 0 or 1).

Artifact ids are compared, so the stages must be deterministic (DESIGN.md §3): a stage whose
artifact holds run measurements (timings) differs between A and B even without kills, and is
reported as such. Not run in CI: it takes minutes.
"""

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TEMP_FILE = re.compile(r"^\..+\.\d+\.\d+\.tmp$")


def copy_pipeline(pipeline: Path, into: Path) -> Path:
    """The pipeline's folder without stores, lockfiles, reports: returns the pipeline's copy."""
    ignore = shutil.ignore_patterns(".smelt", "*.lock", "*.report.html", "__pycache__")
    shutil.copytree(pipeline.parent, into, ignore=ignore)
    return into / pipeline.name


def environment() -> dict:
    env = dict(os.environ)
    for name in ("SMELT_STORE", "SMELT_LOG"):
        env.pop(name, None)
    env["NO_COLOR"] = "1"
    return env


def run(smelt: str, pipeline: Path, log) -> subprocess.Popen:
    return subprocess.Popen(
        [smelt, "run", str(pipeline)],
        cwd=pipeline.parent,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=environment(),
    )


def artifacts(pipeline: Path) -> dict:
    """Stage → artifact id, from the lockfile (YAML written by smelt: `  artifact: <hex>`)."""
    ids, stage = {}, None
    lock = pipeline.with_suffix(".lock")
    for line in lock.read_text().splitlines():
        top = re.match(r"^  (\S[^:]*):\s*$", line)
        if top:
            stage = top.group(1).strip("'\"")
        found = re.match(r"^    artifact:\s*(\S+)", line)
        if found and stage:
            ids[stage] = found.group(1).strip("'\"")
    return ids


def leftovers(folder: Path, store: Path) -> list:
    """What an interrupted run may leave and a finished one must not."""
    found = [str(p) for sub in ("tmp", "work") for p in sorted((store / sub).glob("*"))]
    found += [str(p) for p in sorted(folder.rglob(".*.tmp")) if TEMP_FILE.match(p.name)]
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smelt", default="target/release/smelt", help="the smelt binary")
    parser.add_argument("--pipeline", default="pipelines/quickstart.yaml")
    parser.add_argument("-n", "--kills", type=int, default=20, help="runs killed (N)")
    parser.add_argument("--seed", type=int, default=None, help="for the kill delays")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()

    smelt = str(Path(args.smelt).resolve())
    if not os.access(smelt, os.X_OK):
        sys.exit(f"no smelt binary at {smelt}: build it first (cargo build --release)")
    pipeline = Path(args.pipeline).resolve()
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    rng = random.Random(seed)
    work = Path(tempfile.mkdtemp(prefix="smelt-soak-"))
    print(f"kill-soak: {pipeline.name}, N={args.kills}, seed {seed}, in {work}", flush=True)

    a = copy_pipeline(pipeline, work / "a")
    b = copy_pipeline(pipeline, work / "b")
    with open(work / "a.log", "w") as log:
        started = time.monotonic()
        code = run(smelt, a, log).wait()
        duration = time.monotonic() - started
    if code != 0:
        print(f"FAIL: the uninterrupted run exited {code} (see {work}/a.log)")
        return 1
    expected = artifacts(a)
    print(f"uninterrupted run: {duration:.1f}s, {len(expected)} stages", flush=True)

    killed, finished, delays = 0, 0, []
    with open(work / "b.log", "w") as log:
        for i in range(args.kills):
            delay = rng.uniform(0, duration)
            log.write(f"\n=== run {i + 1}: kill after {delay:.2f}s\n")
            log.flush()
            process = run(smelt, b, log)
            try:
                process.wait(timeout=delay)
                finished += 1
            except subprocess.TimeoutExpired:
                process.send_signal(signal.SIGKILL)
                process.wait()
                killed += 1
                delays.append(delay)
        log.write("\n=== final run\n")
        log.flush()
        code = run(smelt, b, log).wait()
    print(
        f"{killed} runs killed (after {min(delays, default=0):.1f}–{max(delays, default=0):.1f}s), "
        f"{finished} ended before their kill; final run exited {code}",
        flush=True,
    )

    problems = []
    if code != 0:
        problems.append(f"the final run exited {code} (see {work}/b.log)")
    got = artifacts(b) if b.with_suffix(".lock").exists() else {}
    same = 0
    for stage, id_a in expected.items():
        id_b = got.get(stage)
        if id_b == id_a:
            same += 1
        else:
            problems.append(f"stage {stage}: artifact {id_b} after kills, {id_a} without")
    print(f"artifact ids: {same} of {len(expected)} stages equal the uninterrupted run's")
    left = leftovers(b.parent, b.parent / ".smelt")
    for path in left:
        problems.append(f"left behind: {path}")
    verify = subprocess.run(
        [smelt, "verify", "--format", "json", str(b)],
        cwd=b.parent,
        capture_output=True,
        text=True,
        env=environment(),
    )
    try:
        report = json.loads(verify.stdout)
        states = [x["state"] for store in report for x in store["artifacts"]]
        bad = [s for s in states if s != "intact"]
        print(f"smelt verify: {len(states) - len(bad)} of {len(states)} artifacts intact")
        if bad or verify.returncode != 0:
            problems.append(f"smelt verify exited {verify.returncode}: {verify.stdout.strip()}")
    except (json.JSONDecodeError, KeyError, TypeError):
        problems.append(f"smelt verify failed: {verify.stdout}{verify.stderr}")

    for problem in problems:
        print(f"  {problem}")
    print(f"N={args.kills} ({killed} killed): {'FAIL' if problems else 'PASS'}")
    if args.keep or problems:
        print(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
