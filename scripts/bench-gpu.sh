#!/usr/bin/env bash
# What GPU support costs, in two parts.
#
# 1. A process that uses no GPU: `cedana dump process` with the GPU hook (the default, gpu.backend = auto)
#    against the same dump with it off (CEDANA_GPU_BACKEND=off), alternating, on one process holding SIZE_MIB
#    of memory (dumped with --leave-running, so the same process every round). Reported: whole-process
#    medians and spread of both, their ratio, and the hook's own `gpu detect` phase (median and largest, from
#    the dump's JSON timings): the time to find the tree's CUDA processes, all the hook does without any.
# 2. A CUDA process (the fake NVIDIA stack of integration/fake-gpu: its libcuda, `cuda-checkpoint` and
#    `nvidia-smi`; a checkpoint action that takes CKPT_MS, as moving device memory out does): `cedana dump
#    process --leave-running` against NVIDIA's documented sequence with the raw tools, alternating:
#    `cuda-checkpoint --action lock`, `--action checkpoint`, `criu dump --leave-running`, `--action restore`,
#    `--action unlock`. cedana runs the lock and checkpoint while CRIU starts up (CRIU waits for them at its
#    pre-dump step) and asks nvidia-smi about the GPUs beside them; the raw sequence waits for each step.
#    With BASE=<another cedana binary>, that build is timed in the same rounds too.
#
#   scripts/bench-gpu.sh            # as root; builds cedana (release) first
#
# Environment: ROUNDS=7, SIZE_MIB=64, NO_BUILD=1 (skip the release build), CEDANA=target/release/cedana,
# PARTS="1 2", GPU_MIB=64 (the fake device memory), CKPT_MS=200, BASE=<cedana binary>.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
ROUNDS=${ROUNDS:-7}
SIZE_MIB=${SIZE_MIB:-64}
CEDANA=${CEDANA:-$ROOT/target/release/cedana}
PARTS=${PARTS:-1 2}
GPU_MIB=${GPU_MIB:-64}
CKPT_MS=${CKPT_MS:-200}
BASE=${BASE:-}

die() { echo "bench-gpu: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root (CRIU needs it)"
if [ "${NO_BUILD:-0}" != 1 ]; then
    (cd "$ROOT" && cargo build --release -p cedana) >&2
fi
[ -x "$CEDANA" ] || die "no cedana binary at $CEDANA"
[ -z "$BASE" ] || [ -x "$BASE" ] || die "no cedana binary at BASE=$BASE"

WORK=$(mktemp -d /var/tmp/cedana-bench-gpu.XXXXXX)
WPID=
GPID=
cleanup() {
    [ -n "$WPID" ] && kill -KILL "$WPID" 2>/dev/null || true
    [ -n "$GPID" ] && kill -KILL "$GPID" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
export CEDANA_LOG_LEVEL=warn

part1() {
gcc -O2 -Wall -o "$WORK/workload" "$HERE/bench/workload.c"
setsid "$WORK/workload" "$SIZE_MIB" "$WORK/pid" </dev/null >/dev/null 2>&1 &
disown
for _ in $(seq 100); do [ -s "$WORK/pid" ] && break; sleep 0.1; done
WPID=$(cat "$WORK/pid")

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
kill -KILL "$WPID" 2>/dev/null || true
WPID=
}

# The fake NVIDIA stack, built as the integration tests build it (integration/src/gpu.rs).
build_fakes() {
    local src="$ROOT/integration/fake-gpu" f="$WORK/fake" cflags=(-O2 -Wall -Wextra -Werror -pthread)
    mkdir -p "$f/lib" "$f/bin" "$f/ctl"
    gcc "${cflags[@]}" -fPIC -shared -fvisibility=hidden -Wl,-soname,libcuda.so.1 -o "$f/lib/libcuda.so.1" "$src/libcuda.c"
    for prog in cuda-checkpoint gpu-app; do
        gcc "${cflags[@]}" -o "$f/bin/$prog" "$src/$prog.c" -L"$f/lib" -l:libcuda.so.1 -Wl,-rpath,'$ORIGIN/../lib'
    done
    install -m 0755 "$src/nvidia-smi" "$f/bin/nvidia-smi"
    mknod "$f/nvidia0" c 1 5
}

part2() {
    build_fakes
    local f="$WORK/fake" tool="$WORK/fake/bin/cuda-checkpoint"
    LD_LIBRARY_PATH="$f/lib" FAKE_CUDA_DEVICE="$f/nvidia0" FAKE_CUDA_DIR="$f/ctl" \
        setsid "$f/bin/gpu-app" "$GPU_MIB" 0 </dev/null >"$WORK/app.log" 2>&1 &
    GPID=$!
    disown
    for _ in $(seq 100); do grep -q '^count' "$WORK/app.log" 2>/dev/null && break; sleep 0.1; done
    grep -q '^count' "$WORK/app.log" || die "the fake CUDA program did not start: $(cat "$WORK/app.log")"
    export FAKE_CUDA_DELAY_MS="checkpoint:$CKPT_MS"
    # One dump; prints "<wall seconds> <gpu checkpoint ms or -> <criu dump ms or ->".
    gpu_dump() { # WHO ROUND
        local who=$1 round=$2 t0 t1 json=""
        local dir="$WORK/gpu-$who-$round"
        t0=$(date +%s.%N)
        case $who in
        raw)
            "$tool" --action lock --pid "$GPID" --timeout 10000
            "$tool" --action checkpoint --pid "$GPID"
            mkdir -p "$dir"
            "$CRIU_BIN" dump -t "$GPID" -D "$dir" --leave-running -o dump.log
            "$tool" --action restore --pid "$GPID"
            "$tool" --action unlock --pid "$GPID"
            ;;
        *)
            local bin=$CEDANA
            [ "$who" = base ] && bin=$BASE
            json=$(CEDANA_GPU_BACKEND=cuda-checkpoint CEDANA_GPU_CUDA_CHECKPOINT="$tool" \
                CEDANA_GPU_NVIDIA_SMI="$f/bin/nvidia-smi" "$bin" dump process "$GPID" --no-server --leave-running \
                --compression none --dir "$WORK" --name "gpu-$who-$round" --output json)
            ;;
        esac
        t1=$(date +%s.%N)
        rm -rf "$dir"
        python3 -c 'import json,sys
t = json.loads(sys.argv[3])["timings_ms"] if sys.argv[3] else {}
print(float(sys.argv[2]) - float(sys.argv[1]), t.get("gpu checkpoint", "-"), t.get("criu dump", "-"))' "$t0" "$t1" "$json"
    }
    local who_all="raw cedana" before after
    [ -n "$BASE" ] && who_all="raw cedana base"
    for who in $who_all; do gpu_dump "$who" warmup >/dev/null; done
    before=$(grep -c '^count' "$WORK/app.log")
    : >"$WORK/gpu-results"
    for r in $(seq "$ROUNDS"); do
        # Each in turn first: raw, cedana[, base], then rotated by one each round.
        local order=($who_all) n=${#order[@]} i
        for i in $(seq 0 $((n - 1))); do
            local who=${order[$(((i + r) % n))]}
            echo "$who $(gpu_dump "$who" "$r")" >>"$WORK/gpu-results"
        done
    done
    sleep 0.3
    after=$(grep -c '^count' "$WORK/app.log")
    grep -q CORRUPT "$WORK/app.log" && die "the fake CUDA program's device memory was corrupted: $(grep CORRUPT "$WORK/app.log" | head -1)"
    kill -0 "$GPID" 2>/dev/null || die "the fake CUDA program died: $(tail -2 "$WORK/app.log")"
    [ "$after" -gt "$before" ] || die "the fake CUDA program made no progress after the dumps"
    python3 - "$WORK/gpu-results" "$GPU_MIB" "$ROUNDS" "$CKPT_MS" <<'EOF2'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
who = [w for w in ("raw", "cedana", "base") if any(r[0] == w for r in rows)]
wall = {w: sorted(float(r[1]) for r in rows if r[0] == w) for w in who}
med = {w: statistics.median(v) for w, v in wall.items()}
print(f"bench-gpu: {sys.argv[3]} rounds, a CUDA process (fake stack, {sys.argv[2]} MiB device memory, checkpoint action {sys.argv[4]} ms), dump --leave-running --compression none")
labels = {"raw": "raw sequence (cuda-checkpoint lock, checkpoint; criu dump; restore, unlock)", "cedana": "cedana dump process", "base": "BASE build"}
for w in who:
    print(f"  {labels[w]:<80} median {med[w]:.3f} s (min {wall[w][0]:.3f}, max {wall[w][-1]:.3f})")
    if w != "raw":
        phases = [r for r in rows if r[0] == w and "-" not in r[2:4]]
        if phases:
            g = statistics.median(float(r[2]) for r in phases)
            c = statistics.median(float(r[3]) for r in phases)
            print(f"  {'':<80} gpu checkpoint {g:.1f} ms, criu dump {c:.1f} ms (medians of its JSON timings)")
for w in who:
    if w != "raw":
        print(f"  ratio {w}/raw {med[w] / med['raw']:.3f}")
if "base" in who:
    print(f"  ratio cedana/base {med['cedana'] / med['base']:.3f}")
EOF2
    kill -KILL "$GPID" 2>/dev/null || true
    GPID=
}

CRIU_BIN=$(command -v criu || echo /usr/local/sbin/criu)
for part in $PARTS; do
    "part$part"
done
