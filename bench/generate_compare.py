#!/usr/bin/env python3
"""Greedy generation speed on SmolLM2-135M-Instruct (scripts/fetch-smollm2.sh): smelt's
`generate` (KV cache) against transformers' `generate` on the same GGUF file, alternated in one
window, 2 threads each.

smelt's time per token is taken as (time for N + 1 new tokens − time for 1) / N, which cancels
loading the file; transformers' is timed around `generate` alone, the model loaded once. Both
generate exactly N tokens (the prompt asks for a long story; min_new_tokens for transformers).

usage: /work/venv-tok/bin/python bench/generate_compare.py [--tokens 64] [--rounds 3]
  (pip install torch transformers gguf)
"""

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("SMELT_MODEL_CACHE", Path.home() / ".cache/smelt/models"))
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "<|im_start|>user\nWrite a long story about a cat who travels the world.<|im_end|>\n<|im_start|>assistant\n"


def smelt_seconds(tokens):
    start = time.perf_counter()
    subprocess.run([str(ROOT / "target/release/smelt"), "generate", str(CACHE / GGUF), "--prompt", PROMPT,
                    "--temperature", "0", "--max-tokens", str(tokens)],
                   check=True, stdout=subprocess.DEVNULL, env=dict(os.environ, RAYON_NUM_THREADS="2"))
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(CACHE, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(CACHE, gguf_file=GGUF, dtype=torch.float32).eval()
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    rows = []
    for _ in range(args.rounds):
        with torch.no_grad():
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False)
            hf = (time.perf_counter() - start) / args.tokens
        ours = (smelt_seconds(args.tokens + 1) - smelt_seconds(1)) / args.tokens
        rows.append({"smelt_ms_per_token": round(ours * 1e3, 1), "transformers_ms_per_token": round(hf * 1e3, 1),
                     "speedup": round(hf / ours, 2)})
        print(json.dumps(rows[-1]), flush=True)
    ratios = sorted(r["speedup"] for r in rows)
    print(json.dumps({"prompt_tokens": ids.shape[1], "new_tokens": args.tokens, "median_speedup": ratios[len(ratios) // 2]}))


if __name__ == "__main__":
    main()
