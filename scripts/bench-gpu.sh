#!/usr/bin/env bash
# What GPU support costs a process that uses no GPU: `cedana dump process` with the GPU hook (the default,
# gpu.backend = auto) against the same dump with it off (CEDANA_GPU_BACKEND=off), alternating, on one
# process holding SIZE_MIB of memory (dumped with --leave-running, so the same process every round).
#
#   scripts/bench-gpu.sh            # as root; builds cedana (release) first
#
# Environment: ROUNDS=7, SIZE_MIB=64, NO_BUILD=1 (skip the release build), CEDANA=target/release/cedana.
# Reported: whole-process medians and spread of both, their ratio, and the hook's own `gpu detect` phase
# (median and largest, from the dump's JSON timings): the time to find the tree's CUDA processes, which is
# all the hook does for a tree without any.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
ROUNDS=${ROUNDS:-7}
SIZE_MIB=${SIZE_MIB:-64}
CEDANA=${CEDANA:-$ROOT/target/release/cedana}

die() { echo "bench-gpu: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root (CRIU needs it)"
if [ "${NO_BUILD:-0}" != 1 ]; then
    (cd "$ROOT" && cargo build --release -p cedana) >&2
fi
[ -x "$CEDANA" ] || die "no cedana binary at $CEDANA"

WORK=$(mktemp -d /var/tmp/cedana-bench-gpu.XXXXXX)
WPID=
cleanup() {
    [ -n "$WPID" ] && kill -KILL "$WPID" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

gcc -O2 -Wall -o "$WORK/workload" "$HERE/bench/workload.c"
setsid "$WORK/workload" "$SIZE_MIB" "$WORK/pid" </dev/null >/dev/null 2>&1 &
for _ in $(seq 100); do [ -s "$WORK/pid" ] && break; sleep 0.1; done
WPID=$(cat "$WORK/pid")
export CEDANA_LOG_LEVEL=warn

# One dump; prints "<wall seconds> <gpu detect ms or ->".
dump() { # MODE ROUND
    local mode=$1 round=$2 t0 t1 json
    t0=$(date +%s.%N)
    if [ "$mode" = off ]; then
        json=$(CEDANA_GPU_BACKEND=off "$CEDANA" dump process "$WPID" --no-server --leave-running --compression none \
            --dir "$WORK" --name "$mode-$round" --output json)
    else
        json=$("$CEDANA" dump process "$WPID" --no-server --leave-running --compression none \
            --dir "$WORK" --name "$mode-$round" --output json)
    fi
    t1=$(date +%s.%N)
    rm -rf "${WORK:?}/$mode-$round"
    python3 -c 'import json,sys; t=json.loads(sys.argv[3])["timings_ms"]; print(float(sys.argv[2]) - float(sys.argv[1]), t.get("gpu detect", "-"))' \
        "$t0" "$t1" "$json"
}

dump auto warmup >/dev/null
dump off warmup >/dev/null
: >"$WORK/results"
for r in $(seq "$ROUNDS"); do
    if [ $((r % 2)) = 1 ]; then order="auto off"; else order="off auto"; fi
    for mode in $order; do
        echo "$mode $(dump "$mode" "$r")" >>"$WORK/results"
    done
done

python3 - "$WORK/results" "$SIZE_MIB" "$ROUNDS" <<'EOF'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
wall = {m: sorted(float(r[1]) for r in rows if r[0] == m) for m in ("auto", "off")}
detect = sorted(float(r[2]) for r in rows if r[0] == "auto" and r[2] != "-")
med = {m: statistics.median(v) for m, v in wall.items()}
print(f"bench-gpu: {sys.argv[3]} alternating rounds, a {sys.argv[2]} MiB process without a GPU, dump --leave-running --compression none")
for m, label in (("off", "GPU hook off  "), ("auto", "GPU hook on   ")):
    print(f"  {label} median {med[m]:.3f} s (min {wall[m][0]:.3f}, max {wall[m][-1]:.3f})")
print(f"  ratio on/off  {med['auto'] / med['off']:.3f}")
print(f"  gpu detect    median {statistics.median(detect):.3f} ms, largest {detect[-1]:.3f} ms")
EOF
