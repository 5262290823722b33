#!/usr/bin/env bash
# Fuzz cedana's decoders of untrusted input: scripts/fuzz.sh [SECONDS_PER_TARGET] (default 20).
#
# Builds the cargo-fuzz targets in fuzz/ (installing cargo-fuzz when missing) and runs each for that long,
# from its committed seeds (fuzz/seeds/<target>) and its growing corpus (fuzz/corpus/<target>, not
# committed). Prints one line per target (runs, coverage, crashes) and fails if any target crashed, hung or
# ran out of memory; the input that did is kept in fuzz/artifacts/<target>/ (replay it with
# `<binary> <file>`).
#
# Without a nightly toolchain there is no fuzzing: the script says so and replays every seed and corpus
# input once through the targets built with the stable toolchain instead, so CI still checks them.
#
# Environment: FUZZ_REPLAY_ONLY=1 (replay as without nightly), FUZZ_SANITIZER (none|address, default none: twice as many runs on a small machine; Rust code
# is memory-safe, and overflow checks are on either way), FUZZ_TARGETS (space-separated subset),
# FUZZ_RSS_MB (memory limit per target, default 2048), CARGO_TARGET_DIR.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
secs=${1:-20}
targets=(${FUZZ_TARGETS:-archive_open archive_indexed manifest criu_stats streamer_request runc_args zstd_unit})
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target}
cd "$root/fuzz"

inputs() { # The seed and corpus files of target $1.
    find "seeds/$1" "corpus/$1" -type f 2>/dev/null || true
}

if [ -n "${FUZZ_REPLAY_ONLY:-}" ] || ! rustup toolchain list 2>/dev/null | grep '^nightly' >/dev/null; then
    why="no nightly toolchain (rustup toolchain install nightly)"
    [ -n "${FUZZ_REPLAY_ONLY:-}" ] && why="FUZZ_REPLAY_ONLY is set"
    echo "fuzz.sh: $why: NOT fuzzing; replaying the seed and corpus inputs on stable instead"
    cargo build --release --locked --bins
    for t in "${targets[@]}"; do
        # In batches (a long run's corpus outgrows one command line); a failed input fails the batch.
        inputs "$t" | tr '\n' '\0' | xargs -0 -r "$CARGO_TARGET_DIR/release/$t" >"/tmp/fuzz-replay-$t.log" 2>&1 ||
            { tail -20 "/tmp/fuzz-replay-$t.log"; echo "fuzz.sh: $t failed on a replayed input"; exit 1; }
        echo "$t: replayed $(inputs "$t" | wc -l) inputs, no crash"
    done
    exit 0
fi

if ! command -v cargo-fuzz >/dev/null; then
    cargo install cargo-fuzz --locked
fi
cargo +nightly fuzz build -s "${FUZZ_SANITIZER:-none}" --debug-assertions
bin_dir="$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/release"

failed=0
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t" "seeds/$t"
    log="artifacts/$t/last-run.log"
    status=0
    "$bin_dir/$t" "corpus/$t" "seeds/$t" -max_total_time="$secs" -timeout=10 -rss_limit_mb="${FUZZ_RSS_MB:-2048}" \
        -print_final_stats=1 -artifact_prefix="artifacts/$t/" >"$log" 2>&1 || status=$?
    # (A target that crashed at its first input printed no coverage: still reported below, not an abort.)
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    cov=$( (grep -o 'cov: [0-9]*' "$log" || true) | tail -1 | cut -d' ' -f2)
    crashes=$(find "artifacts/$t" -type f \( -name 'crash-*' -o -name 'timeout-*' -o -name 'oom-*' -o -name 'leak-*' \) | wc -l)
    echo "$t: ${secs}s, runs ${runs:-?}, coverage ${cov:-?}, corpus $(find "corpus/$t" -type f | wc -l), crashes $crashes, exit $status"
    if [ "$status" -ne 0 ] || [ "$crashes" -ne 0 ]; then
        failed=1
        grep -m3 -E 'panicked|ERROR|SUMMARY' "$log" || true
    fi
done
exit $failed
