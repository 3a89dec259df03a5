#!/usr/bin/env bash
# Fuzzes every target of fuzz/ for a bounded time, starting from its committed seeds
# (fuzz/corpus/<target>/), with cargo fuzz (libFuzzer). A panic, an input over the memory
# limit (RSS over 2 GB, as unbounded memory shows on inputs of at most a few KB) or an input
# taking over 10 s fails the run; the input is saved in fuzz/artifacts/<target>/.
#
#   fuzz/run.sh                 # every target, FUZZ_SECONDS (default 40) each
#   fuzz/run.sh pipeline 300    # one target, 5 minutes
#
# Inputs the fuzzer finds go to fuzz/work/<target>/ (ignored), never into the committed seeds:
# to keep one (a crash, once fixed), copy it into fuzz/corpus/<target>/.
#
# Built with the project's own (stable) toolchain and no sanitizer (--sanitizer none): then
# cargo fuzz passes only stable -C flags (coverage instrumentation), and needs no nightly. A
# sanitizer would need nightly's -Zsanitizer, and nightly here (1.97, 2026-05-15) cannot compile
# dfdx 0.13; the code these targets reach is safe Rust anyway. Installs cargo-fuzz (pinned) when
# it is missing.
set -euo pipefail
cd "$(dirname "$0")"

CARGO_FUZZ_VERSION=0.13.2
seconds=${FUZZ_SECONDS:-40}
targets=()
for arg in "$@"; do
    if [[ $arg =~ ^[0-9]+$ ]]; then seconds=$arg; else targets+=("$arg"); fi
done

if ! cargo fuzz --version 2>/dev/null | grep -qF "$CARGO_FUZZ_VERSION"; then
    cargo install --locked cargo-fuzz --version "$CARGO_FUZZ_VERSION"
fi
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo fuzz list)
fi

# Release code with overflow checks and debug assertions on, as the tests run it.
build=(--sanitizer none --debug-assertions)
started=$(date +%s)
mkdir -p work
if ! cargo fuzz build "${build[@]}" >work/build.log 2>&1; then
    tail -n 40 work/build.log
    exit 1
fi
built=$(date +%s)
echo "fuzz: built in $((built - started))s; ${seconds}s per target"

max_len() {
    case $1 in
        model_dir | gguf) echo 32768 ;;  # a tiny model's weights are about 11 KB
        *) echo 16384 ;;
    esac
}

failed=()
summary=()
# -close_fd_mask=1 closes the targets' stdout: `tokenizers` prints a warning there for every
# vocabulary with holes (hundreds of MB a minute). Panics and libFuzzer's reports go to stderr.
for target in "${targets[@]}"; do
    mkdir -p "work/$target" "artifacts/$target"
    log="work/$target.log"
    if cargo fuzz run "${build[@]}" "$target" "work/$target" "corpus/$target" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -max_len="$(max_len "$target")" \
        -timeout=10 -print_final_stats=1 -close_fd_mask=1 >"$log" 2>&1; then
        outcome=ok
    else
        outcome=FAILED
        failed+=("$target")
        tail -n 40 "$log"
    fi
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')
    cover=$(grep -o 'cov: [0-9]*' "$log" | tail -n 1 | grep -o '[0-9]*' || echo '?')
    summary+=("$(printf '%-16s %-7s %10s execs  cov %s' "$target" "$outcome" "$execs" "$cover")")
done
printf '%s\n' "${summary[@]}"
echo "fuzz: $(( $(date +%s) - started ))s in all"
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz: ${failed[*]} failed; see fuzz/work/<target>.log and fuzz/artifacts/<target>/"
    exit 1
fi
