"""The PyTorch reference for `smelt bench train --precision bf16`: ../shared/bench/torch_gpt.py's
benchmark (same model, batch, optimizer and timing) run under PyTorch's CPU autocast to bf16,
which sends the linear layers and matmuls to oneDNN's bf16 kernels (AMX where the CPU has it).

usage: torch_autocast.py A|B [--warmup N] [--steps N] [--threads T]
Prints one JSON line in torch_gpt.py's format, with impl "torch+autocast(bf16)".
"""
import argparse
import contextlib
import io
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "shared", "bench"))
import torch_gpt  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("config", nargs="?", default="A")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    printed = io.StringIO()
    # The whole loop runs in one autocast region, so its cache of bf16 weight copies is off:
    # with it on, every step would reuse the copies made at step 0 and never see an update
    # (the loss stalls). Each step casts each weight once either way.
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False)
    with autocast, contextlib.redirect_stdout(printed):
        torch_gpt.bench(a.config, a.warmup, a.steps)
    report = json.loads(printed.getvalue().strip().splitlines()[-1])
    report["impl"] = "torch+autocast(bf16)"
    print(json.dumps(report))


if __name__ == "__main__":
    main()
