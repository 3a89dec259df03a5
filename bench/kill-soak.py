#!/usr/bin/env python3
"""Kill-anywhere soak: `smelt run` killed with SIGKILL at random moments, then run to the end,
must give the artifacts an uninterrupted run gives, and leave nothing half-done behind.

    bench/kill-soak.py                                   # the quickstart, 20 kills, target/release/smelt
    bench/kill-soak.py -n 50 --pipeline pipelines/corpus.yaml --smelt target/debug/smelt

It builds nothing. In a fresh temporary folder it copies the pipeline's folder (its file and the
data next to it, no store, lockfile or report), once per store:
  A, A2: one uninterrupted run each, timed; their lockfiles give every stage's artifact id;
  B1, B2, ...: rounds. In a round, `smelt run` is started again and again on the same copy,
     each killed with SIGKILL after a delay drawn uniformly from [0, the shorter of A's and
     A2's times], until a run ends by itself (less work was left than its delay) or N kills
     are done in all; then one run to completion. So each round builds the pipeline through
     one or more kills.
After each round it checks: every stage's artifact id equals A's; the store's tmp/ and work/
are empty and no temp file of an atomic write (`.NAME.PID.N.tmp`) is left anywhere; `smelt
verify` finds every artifact intact. Prints N, the rounds, and PASS or FAIL (exit 0 or 1).

Artifact ids are compared, so the stages must be deterministic (DESIGN.md §3). A stage whose
id differs between A and A2, which no kill touched (an artifact that holds run measurements,
or a stage downstream of one), is reported as not deterministic and left out of the
comparison. Not run in CI: it takes minutes.
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


def check(smelt: str, b: Path, code: int, expected: dict, unstable: list) -> list:
    """What is wrong with the copy `b` after its last run (which exited `code`)."""
    problems = []
    if code != 0:
        problems.append(f"the final run exited {code}")
    got = artifacts(b) if b.with_suffix(".lock").exists() else {}
    for stage in expected:
        if stage not in unstable and got.get(stage) != expected[stage]:
            problems.append(f"stage {stage}: artifact {got.get(stage)}, {expected[stage]} without kills")
    problems += [f"left behind: {path}" for path in leftovers(b.parent, b.parent / ".smelt")]
    verify = subprocess.run(
        [smelt, "verify", "--format", "json", str(b)],
        cwd=b.parent,
        capture_output=True,
        text=True,
        env=environment(),
    )
    try:
        states = [x["state"] for store in json.loads(verify.stdout) for x in store["artifacts"]]
        if verify.returncode != 0 or any(s != "intact" for s in states):
            problems.append(f"smelt verify exited {verify.returncode}: {verify.stdout.strip()}")
    except (json.JSONDecodeError, KeyError, TypeError):
        problems.append(f"smelt verify failed: {verify.stdout}{verify.stderr}")
    return problems


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
    a2 = copy_pipeline(pipeline, work / "a2")
    durations = []
    for folder in (a, a2):
        with open(work / f"{folder.parent.name}.log", "w") as log:
            started = time.monotonic()
            code = run(smelt, folder, log).wait()
            durations.append(time.monotonic() - started)
        if code != 0:
            print(f"FAIL: an uninterrupted run exited {code} (see {work}/{folder.parent.name}.log)")
            return 1
    # The kill window: the faster run, so that kills are spread over the whole run even when
    # the machine was busier during one of them.
    duration = min(durations)
    expected, again = artifacts(a), artifacts(a2)
    unstable = sorted(s for s in expected if again.get(s) != expected[s])
    print(f"uninterrupted runs: {durations[0]:.1f}s and {durations[1]:.1f}s, {len(expected)} stages")
    if unstable:
        print(f"not deterministic (the two differ), not compared: {', '.join(unstable)}")

    killed, rounds, delays, problems = 0, 0, [], []
    while killed < args.kills:
        # A round: runs on a fresh copy, each killed after a random delay, until one ends by
        # itself (the work left is shorter than its delay) or N kills are done; then checks.
        rounds += 1
        b = copy_pipeline(pipeline, work / f"b{rounds}")
        with open(work / f"b{rounds}.log", "w") as log:
            while True:
                delay = rng.uniform(0, duration) if killed < args.kills else None
                log.write(f"\n=== run, kill after {delay}s\n")
                log.flush()
                process = run(smelt, b, log)
                try:
                    code = process.wait(timeout=delay)
                    break
                except subprocess.TimeoutExpired:
                    process.send_signal(signal.SIGKILL)
                    process.wait()
                    killed += 1
                    delays.append(delay)
        found = check(smelt, b, code, expected, unstable)
        print(f"round {rounds}: {killed} kills so far; {'; '.join(found) or 'ok'}", flush=True)
        problems += [f"round {rounds}: {p}" for p in found]
        if not found:
            shutil.rmtree(b.parent)
    print(
        f"{killed} runs killed in {rounds} rounds "
        f"(after {min(delays, default=0):.1f}–{max(delays, default=0):.1f}s)"
    )
    for problem in problems:
        print(f"  {problem}")
    compared = len(expected) - len(unstable)
    print(
        f"N={killed}: {'FAIL' if problems else 'PASS'} ({rounds} rounds; each: ids of "
        f"{compared} of {len(expected)} stages equal, no leftovers, smelt verify clean)"
    )
    if args.keep or problems:
        print(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
