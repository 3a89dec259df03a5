#!/usr/bin/env python3
"""Checks a smelt model directory (a pretrain stage's artifact) with transformers.

Loads it with `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`, then, for
each prompt, compares transformers' greedy continuation with `smelt generate --temperature 0`
(token for token, so the logits' argmax agree at every step), and reports transformers' loss on
the prompt next to the model's config.

usage: /work/venv-tok/bin/python bench/check_model.py MODEL_DIR [--tokens N] [--prompt TEXT ...]
  (venv: pip install torch transformers)
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

SMELT = str(Path(__file__).resolve().parent.parent / "target" / "release" / "smelt")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model", type=Path)
    parser.add_argument("--tokens", type=int, default=40, help="keep prompt + tokens within the context")
    parser.add_argument("--prompt", nargs="*", default=["ROMEO:", "First Citizen:\nWe are", "The king"])
    args = parser.parse_args()
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    report = {"parameters": sum(p.numel() for p in model.parameters()), "prompts": []}
    for prompt in args.prompt:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=args.tokens, do_sample=False,
                                 eos_token_id=model.config.eos_token_id, pad_token_id=model.config.eos_token_id)
            loss = model(ids, labels=ids).loss.item() if ids.shape[1] > 1 else None
        theirs = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        ours = subprocess.run([SMELT, "generate", str(args.model), "--prompt", prompt, "--temperature", "0",
                               "--max-tokens", str(args.tokens)], check=True, capture_output=True, text=True).stdout
        ours = ours[:-1] if ours.endswith("\n") else ours
        same = ours == theirs
        report["prompts"].append({"prompt": prompt, "same_greedy_continuation": same, "loss": loss, "text": theirs})
        if not same:
            print(json.dumps(report, indent=1))
            sys.exit(f"continuations differ for {prompt!r}:\nsmelt:        {ours!r}\ntransformers: {theirs!r}")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
