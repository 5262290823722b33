#!/usr/bin/env bash
# The whole test suite: installs what it needs (scripts/setup.sh, idempotent), checks formatting and clippy,
# builds the workspace, then runs every unit test and every integration test against the real CRIU, runc,
# containerd and dockerd.
# Needs root (CRIU, mounts, container engines). Extra arguments go to `cargo test` (e.g. a test name).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $(id -u) -ne 0 ]]; then
  echo "scripts/test.sh: the integration tests drive CRIU and container engines; run as root (sudo $0)" >&2
  exit 1
fi

bash scripts/setup.sh
# CRIU restores processes under their original PIDs. With the kernel's small default PID space (32768 on a
# 2-core machine) the suite's thousands of processes wrap around it, and a new process can take the PID of a
# dumped one before its restore (seen in daemon_load). The 64-bit maximum keeps new PIDs clear of them.
if [[ $(cat /proc/sys/kernel/pid_max) -lt 4194304 ]]; then
  echo 4194304 >/proc/sys/kernel/pid_max
fi
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$HOME/.cargo/bin:$PATH

# Lint gates: formatting and clippy (warnings are errors).
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# A short fuzzing round over the decoders of untrusted input (docs/fuzzing.md); fails on any crash.
bash scripts/fuzz.sh "${CEDANA_FUZZ_SECONDS:-10}"
# The integration tests run the built binaries, so build them first.
cargo build --workspace --locked
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
# A watchdog: a hung test fails the run with its name printed (libtest names tests running over 60 s)
# instead of eating CI's whole time limit.
timeout --kill-after=30s "${CEDANA_TEST_TIMEOUT:-40m}" cargo test --workspace --locked --no-fail-fast -- "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line over every test binary (cargo prints one result line per binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed;?$/) p += $(i-1); if ($i ~ /^failed;?$/) f += $(i-1) } }
     END { printf "total: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
