#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets into fuzz/corpus/<target>/ (committed; rerun
only to change them). Every seed is small: the whole corpus stays well under 200 KB.

    python3 fuzz/make_seeds.py [--tokenizers DIR]

--tokenizers: a folder of tokenizer.json files to take as seeds of `tokenizer_json` (made by
`smelt run fuzz/seed-tokenizers.yaml`: one per kind of vocabulary the tokenize stage trains,
each small). Without it, those seeds are left as they are.
"""

import argparse
import json
import shutil
import struct
from pathlib import Path

FUZZ = Path(__file__).resolve().parent
ROOT = FUZZ.parent
CORPUS = FUZZ / "corpus"


def write(target: str, name: str, data: bytes) -> None:
    folder = CORPUS / target
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)


def pipelines() -> None:
    for path in sorted((ROOT / "pipelines").glob("*.yaml")):
        write("pipeline", path.name, path.read_bytes())
    write("pipeline", "starter.yaml", (ROOT / "src/templates/starter.yaml").read_bytes())
    head = "smelt: 1\nname: t\n"
    mistakes = {
        "unknown-kind.yaml": head + "stages:\n  a:\n    uses: comand\n",
        "misspelt-param.yaml": head
        + "stages:\n  a:\n    uses: command\n    with: { run: x, dpes: [], evn: {} }\n",
        "cycle.yaml": head
        + "stages:\n"
        + "".join(
            f"  {n}:\n    uses: command\n    inputs: {{ x: {i} }}\n    with: {{ run: x }}\n"
            for n, i in [("a", "c"), ("b", "a"), ("c", "b")]
        ),
        "duplicate-key.yaml": head + "stages:\n  a:\n    uses: command\n    with: { run: x, run: y }\n",
        "vars.yaml": head
        + "vars: { seed: 1, n: 3 }\nstages:\n  a:\n    uses: command\n"
        + "    with: { run: \"echo ${vars.sede} ${vars.n}\" }\n",
        "many-problems.yaml": head
        + "stages:\n  a:\n    uses: comand\n  b:\n    uses: command\n    inputs: { x: zz }\n"
        + "    with: { run: x, bogus: 1 }\n  c:\n    use: command\n",
        "alias.yaml": "smelt: 1\na0: &a0 [x, x, x]\na1: &a1 [*a0, *a0, *a0]\nstages: {}\n",
        "types.yaml": head
        + "stages:\n  t:\n    uses: tokenize\n    inputs: { corpus: c }\n"
        + "    with: { train: { model: wordpiece, vocab_size: -1 }, max_length: 1.5e3 }\n"
        + "  c:\n    uses: collect\n    with: { sources: [ { files: { glob: '*.txt', split_on: chunk } } ] }\n",
        "unicode.yaml": head + "stages:\n  \u00e9t\u00e9:\n    uses: command\n    with: { run: \"\u6f22\u5b57 \U0001f980\" }\n",
        "not-utf8.yaml": None,
    }
    for name, text in mistakes.items():
        data = text.encode() if text is not None else b"smelt: 1\nname: \xff\xfe\n"
        write("pipeline", name, data)


def collect_files() -> None:
    # Byte 0: bits 0-1 format (0 text, 1 jsonl, 2 csv), bits 2-3 split_on (file, paragraph,
    # line, chunk), bit 4 skip invalid UTF-8, bit 5 field `content`; byte 1: limit / 16.
    def seed(name, flags, limit, data: bytes):
        write("collect_file", name, bytes([flags, limit]) + data)

    jsonl = b"\n".join(
        json.dumps(r).encode()
        for r in [
            {"text": "A plain document.", "id": "doc-1"},
            {"text": "caf\u00e9 \u6f22\u5b57\n\ttabs"},
            {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]},
            {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
            {"text": ""},
            {"text": 3},
            {"other": "no text field"},
            [1, 2],
        ]
    )
    seed("jsonl", 1, 64, jsonl + b"\n\n   \n{\"text\": \"last line, no newline\"}")
    seed("jsonl-crlf", 1 | 16, 8, b'{"text": "one"}\r\n{"text": "t\xffwo"}\r\n')
    seed("jsonl-content", 1 | 32, 255, b'{"content": "the field"}\n{"text": "not it"}\n')
    csv = (
        b"\xef\xbb\xbfid,text,source\n"
        b"1,A cell,here\n"
        b'2,"Quoted, with a comma and ""quotes""",there\n'
        b'3,"Across\nlines",x\n'
        b"4,short row\n"
    )
    seed("csv", 2, 64, csv)
    seed("csv-content", 2 | 32, 2, b"content,other\nsome text,1\n,2\n" + b"x" * 40 + b",3\n")
    text = b"First paragraph,\non two lines.\n\n\nSecond one.\n  \nThird \xe2\x80\x94 dash.\n"
    for split, name in enumerate(["file", "paragraph", "line", "chunk"]):
        seed(f"text-{name}", split << 2, 255, text)
    seed("text-long-lines", 2 << 2 | 16, 1, b"short\n" + b"y" * 100 + b"\n\xff\xfe bad\nend")


def shard_records() -> None:
    lines = [
        {"id": "a:1", "text": "hello", "source": "a"},
        {
            "id": "c:1",
            "text": "user: hi",
            "source": "chat",
            "messages": [{"role": "user", "content": "hi"}],
        },
        {"id": "p:1", "text": "q", "source": "p", "prompt": "q", "chosen": "y", "rejected": "n"},
    ]
    body = b"\n".join(json.dumps(r).encode() for r in lines)
    write("shard_records", "records", bytes([7]) + body + b"\n")
    write("shard_records", "unterminated", bytes([200]) + body + b"\n{\"id\": 1}")
    write("shard_records", "bad-lines", bytes([1]) + b"\n\nnot json\n{}\n\xff\n")


def tokenizers(folder: Path) -> None:
    target = CORPUS / "tokenizer_json"
    if target.exists():
        shutil.rmtree(target)
    for path in sorted(folder.glob("*.json")):
        write("tokenizer_json", path.name, path.read_bytes())


def safetensors(tensors: dict) -> bytes:
    header, data = {}, b""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def model_dirs() -> None:
    # config.json, a NUL byte, model.safetensors.
    for fixture in ["gpt2-smelt-export", "gpt2-tiny-untied", "llama3-rope-bias", "mistral-window"]:
        folder = ROOT / "tests/fixtures" / fixture
        config = json.loads((folder / "config.json").read_text())
        compact = json.dumps(config, separators=(",", ":")).encode()
        write("model_dir", fixture, compact + b"\0" + (folder / "model.safetensors").read_bytes())
    config = {"model_type": "gpt2", "vocab_size": 2, "n_positions": 1, "n_embd": 1, "n_layer": 1, "n_head": 1}
    odd = safetensors(
        {
            "wte.weight": ("F16", [2, 1], b"\x00\x3c\x00\xbc"),
            "wpe.weight": ("BF16", [1, 1], b"\x80\x3f"),
            "h.0.ln_1.weight": ("I64", [1], b"\x01" + b"\x00" * 7),
        }
    )
    write("model_dir", "tiny-other-dtypes", json.dumps(config).encode() + b"\0" + odd)
    huge = dict(config, n_embd=1 << 40, n_head=1 << 20, vocab_size=1 << 30)
    write("model_dir", "sizes-beyond-the-file", json.dumps(huge).encode() + b"\0" + odd)
    write("model_dir", "no-weights", json.dumps(config).encode())
    llama = {"model_type": "llama", "vocab_size": 1 << 30, "hidden_size": 1 << 20, "intermediate_size": 1 << 20,
             "num_hidden_layers": 1 << 10, "num_attention_heads": 1 << 10, "num_key_value_heads": 1 << 5,
             "max_position_embeddings": 1 << 30, "rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4}}
    write("model_dir", "llama-beyond-the-file", json.dumps(llama).encode() + b"\0" + odd)


def gguf_file(metadata: list, tensors: list) -> bytes:
    """A GGUF v3 file: metadata (key, value: int, float, str or list of str), then tensors
    (name, HF shape, ggml type, raw bytes), data aligned to 32 bytes."""
    def string(s: str) -> bytes:
        raw = s.encode()
        return struct.pack("<Q", len(raw)) + raw

    def value(v) -> bytes:
        if isinstance(v, bool):
            return struct.pack("<IB", 7, v)
        if isinstance(v, int):
            return struct.pack("<Iq", 11, v)
        if isinstance(v, float):
            return struct.pack("<Id", 12, v)
        if isinstance(v, str):
            return struct.pack("<I", 8) + string(v)
        if all(isinstance(x, int) for x in v):
            return struct.pack("<IIQ", 9, 5, len(v)) + b"".join(struct.pack("<i", x) for x in v)
        return struct.pack("<IIQ", 9, 8, len(v)) + b"".join(string(x) for x in v)

    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata))
    for key, v in metadata:
        out += string(key) + value(v)
    offset, data = 0, b""
    for name, shape, kind, raw in tensors:
        out += string(name) + struct.pack("<I", len(shape)) + b"".join(struct.pack("<Q", d) for d in reversed(shape))
        out += struct.pack("<IQ", kind, offset)
        padded = raw + b"\0" * (-len(raw) % 32)
        data += padded
        offset += len(padded)
    out += b"\0" * (-len(out) % 32)
    return out + data


def ggufs() -> None:
    # A two-layer Llama of width 32 (one 32-value block per row), tied, GQA 2 on 1: Q8_0 and
    # Q4_1 matrices, Q4_0 and F16 ones, F32 norms; a byte-level BPE tokenizer of 8 tokens.
    h, inter, vocab = 32, 32, 8
    def q8_0(rows, cols):
        return b"".join(struct.pack("<e", 0.01) + bytes((r * 7 + j) % 256 for j in range(32)) for r in range(rows * cols // 32))
    def q4_1(rows, cols):
        return b"".join(struct.pack("<ee", 0.02, -0.1) + bytes((r + j) % 256 for j in range(16)) for r in range(rows * cols // 32))
    def q4_0(rows, cols):
        return b"".join(struct.pack("<e", 0.03) + bytes((r * 3 + j) % 256 for j in range(16)) for r in range(rows * cols // 32))
    def f16(n):
        return b"".join(struct.pack("<e", ((i % 7) - 3) * 0.01) for i in range(n))
    ones = struct.pack("<32f", *[1.0] * 32)
    tensors = [("token_embd.weight", [vocab, h], 8, q8_0(vocab, h)), ("output_norm.weight", [h], 0, ones)]
    for layer in range(2):
        b = f"blk.{layer}."
        tensors += [
            (b + "attn_norm.weight", [h], 0, ones), (b + "ffn_norm.weight", [h], 0, ones),
            (b + "attn_q.weight", [h, h], 3, q4_1(h, h)), (b + "attn_k.weight", [16, h], 3, q4_1(16, h)),
            (b + "attn_v.weight", [16, h], 2, q4_0(16, h)), (b + "attn_output.weight", [h, h], 1, f16(h * h)),
            (b + "ffn_gate.weight", [inter, h], 3, q4_1(inter, h)), (b + "ffn_up.weight", [inter, h], 8, q8_0(inter, h)),
            (b + "ffn_down.weight", [h, inter], 2, q4_0(h, inter)),
        ]
    tokens = ["<|endoftext|>", "a", "b", "Ġ", "ab", "Ġa", "1", "2"]
    metadata = [
        ("general.architecture", "llama"), ("llama.context_length", 16), ("llama.embedding_length", h),
        ("llama.block_count", 2), ("llama.feed_forward_length", inter), ("llama.attention.head_count", 2),
        ("llama.attention.head_count_kv", 1), ("llama.rope.freq_base", 10000.0),
        ("llama.attention.layer_norm_rms_epsilon", 1e-5), ("tokenizer.ggml.model", "gpt2"),
        ("tokenizer.ggml.pre", "smollm"), ("tokenizer.ggml.tokens", tokens),
        ("tokenizer.ggml.token_type", [3, 1, 1, 1, 1, 1, 1, 1]), ("tokenizer.ggml.merges", ["a b", "Ġ a"]),
        ("tokenizer.ggml.eos_token_id", 0),
    ]
    write("gguf", "tiny-llama", gguf_file(metadata, tensors))
    write("gguf", "tiny-qwen2", gguf_file([("general.architecture", "qwen2")] + [
        (k.replace("llama.", "qwen2."), v) for k, v in metadata[1:]], tensors))
    write("gguf", "no-tensors", gguf_file(metadata, []))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizers", type=Path)
    args = parser.parse_args()
    pipelines()
    collect_files()
    shard_records()
    model_dirs()
    ggufs()
    if args.tokenizers:
        tokenizers(args.tokenizers)
    total = sum(p.stat().st_size for p in CORPUS.rglob("*") if p.is_file())
    print(f"{CORPUS}: {sum(1 for p in CORPUS.rglob('*') if p.is_file())} seeds, {total} bytes")


if __name__ == "__main__":
    main()
