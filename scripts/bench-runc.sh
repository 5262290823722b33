#!/usr/bin/env bash
# Benchmark checkpoints of a container holding SIZE_MIB of memory (half pseudo-random, half repeated text):
#   1. `cedana dump runc` against `runc checkpoint` (and against `runc checkpoint` + `tar | zstd -1 -T0`, the
#      same end result as ours with zstd);
#   2. `docker checkpoint create` of a container run with `--runtime cedana` against one run with Docker's runc.
# Every dump uses --leave-running, so the same containers serve every round; outputs are deleted after each
# run. Modes alternate within a round, and the order flips every round.
#
#   scripts/bench-runc.sh              # as root; builds cedana and cedana-runc (release) first
#
# Environment:
#   ROUNDS=5             measured rounds (after WARMUP=1 unmeasured ones)
#   SIZE_MIB=1024        memory held by the workload
#   MODES="none lz4 zstd"   compressions of `cedana dump runc` (none = a folder, runc's output plus a manifest)
#   DOCKER=1             also run part 2 (0 skips it)
#   BENCH_DIR=/var/tmp/cedana-bench-runc.PID   work folder (removed at the end unless KEEP=1)
#   NO_BUILD=1           use the binaries in target/release as they are
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
ROUNDS=${ROUNDS:-5}
WARMUP=${WARMUP:-1}
SIZE_MIB=${SIZE_MIB:-1024}
MODES=${MODES:-"none lz4 zstd"}
DOCKER=${DOCKER:-1}
BENCH_DIR=${BENCH_DIR:-/var/tmp/cedana-bench-runc.$$}
CEDANA=$ROOT/target/release/cedana
WRAPPER=$ROOT/target/release/cedana-runc
DOCKER_CLI=/usr/bin/docker
[ -x "$DOCKER_CLI" ] || DOCKER_CLI=docker

die() { echo "bench-runc: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root"
for tool in runc gcc tar zstd python3 busybox; do command -v "$tool" >/dev/null || die "$tool is missing (scripts/setup.sh)"; done
[ "${NO_BUILD:-0}" = 1 ] || (cd "$ROOT" && cargo build --release -p cedana -p cedana-runc >&2)

mkdir -p "$BENCH_DIR"
RESULTS=$BENCH_DIR/results.tsv
: >"$RESULTS"
RUNC_ROOT=$BENCH_DIR/runc-root
CID=bench-runc-$$
DOCKERD_PID=

cleanup() {
    runc --root "$RUNC_ROOT" delete --force "$CID" >/dev/null 2>&1 || true
    if [ -n "$DOCKERD_PID" ]; then
        dk rm -f bench-plain bench-cedana >/dev/null 2>&1 || true
        kill "$DOCKERD_PID" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.2; done
        for d in /sys/fs/cgroup/*/cedana-bench-$$; do
            [ -d "$d" ] && find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null || true
        done
    fi
    [ "${KEEP:-0}" = 1 ] || rm -rf "$BENCH_DIR"
}
trap cleanup EXIT

# --- a bundle: busybox rootfs + the static memory workload ------------------------------------------------
BUNDLE=$BENCH_DIR/bundle
mkdir -p "$BUNDLE/rootfs/bin"
cp /bin/busybox "$BUNDLE/rootfs/bin/busybox"
for a in $(busybox --list); do [ "$a" = busybox ] || ln -sf busybox "$BUNDLE/rootfs/bin/$a"; done
mkdir -p "$BUNDLE/rootfs/"{proc,sys,dev,tmp,etc}
gcc -static -O2 -o "$BUNDLE/rootfs/bin/memory" "$ROOT/integration/workloads/memory.c"
runc spec --bundle "$BUNDLE"
python3 - "$BUNDLE/config.json" "$SIZE_MIB" <<'EOF'
import json, sys
p, mib = sys.argv[1], sys.argv[2]
c = json.load(open(p))
c["process"]["terminal"] = False
c["process"]["args"] = ["/bin/memory", mib]
c["root"]["readonly"] = False
json.dump(c, open(p, "w"))
EOF

# Start a container with stdout into a pipe (CRIU cannot dump a host file); wait for its checksum line.
runc --root "$RUNC_ROOT" run -d --bundle "$BUNDLE" "$CID" </dev/null 2>&1 | cat >"$BENCH_DIR/runc-out.txt" &
for _ in $(seq 600); do grep -q '^sum ' "$BENCH_DIR/runc-out.txt" 2>/dev/null && break; sleep 0.1; done
grep -q '^sum ' "$BENCH_DIR/runc-out.txt" || die "the workload did not start"

now() { date +%s.%N; }
# record ROUND PART MODE SECONDS BYTES
record() { printf '%s\t%s\t%s\t%s\t%s\n' "$@" >>"$RESULTS"; }
size_of() { du -sb "$1" | cut -f1; }

runc_mode() { # runc checkpoint [+ tar|zstd]
    local round=$1 mode=$2 out=$BENCH_DIR/out-runc t0 t1
    sync; t0=$(now)
    runc --root "$RUNC_ROOT" checkpoint --leave-running --image-path "$out" --work-path "$BENCH_DIR/work" "$CID"
    if [ "$mode" = runc+zstd ]; then
        tar -C "$out" -cf - . | zstd -q -1 -T0 -o "$out.tar.zst"
        rm -rf "$out"; out=$out.tar.zst
    fi
    t1=$(now)
    record "$round" runc "$mode" "$(awk -v a="$t0" -v b="$t1" "BEGIN{print b-a}")" "$(size_of "$out")"
    rm -rf "$out" "$BENCH_DIR/work"
}

cedana_mode() {
    local round=$1 mode=$2 t0 t1 out
    sync; t0=$(now)
    "$CEDANA" dump runc "$CID" --root "$RUNC_ROOT" --leave-running --compression "$mode" --dir "$BENCH_DIR/cps" --name cp >/dev/null
    t1=$(now)
    out=$(ls -d "$BENCH_DIR"/cps/cp*)
    record "$round" runc "cedana-$mode" "$(awk -v a="$t0" -v b="$t1" "BEGIN{print b-a}")" "$(size_of "$out")"
    rm -rf "$BENCH_DIR/cps"
}

part1_round() {
    local round=$1 modes=(runc runc+zstd) m
    for m in $MODES; do modes+=("cedana-$m"); done
    if [ $((round % 2)) = 1 ]; then modes=($(printf '%s\n' "${modes[@]}" | tac)); fi
    for m in "${modes[@]}"; do
        case $m in
            cedana-*) cedana_mode "$round" "${m#cedana-}" ;;
            *) runc_mode "$round" "$m" ;;
        esac
    done
}

echo "part 1: runc container of $SIZE_MIB MiB; $WARMUP warm-up + $ROUNDS rounds" >&2
for r in $(seq $((1 - WARMUP)) "$ROUNDS"); do part1_round "$r"; done
runc --root "$RUNC_ROOT" delete --force "$CID"

# --- part 2: docker checkpoint create, --runtime cedana vs Docker's runc -----------------------------------
dk() { "$DOCKER_CLI" -H "unix://$BENCH_DIR/docker.sock" "$@"; }
if [ "$DOCKER" = 1 ]; then
    dockerd --data-root "$BENCH_DIR/docker-data" --exec-root "$BENCH_DIR/docker-exec" --pidfile "$BENCH_DIR/docker.pid" \
        -H "unix://$BENCH_DIR/docker.sock" --experimental --bridge=none --iptables=false --ip6tables=false --ip-masq=false \
        --cgroup-parent=/cedana-bench-$$ --add-runtime "cedana=$WRAPPER" >"$BENCH_DIR/dockerd.log" 2>&1 &
    DOCKERD_PID=$!
    for _ in $(seq 300); do dk version >/dev/null 2>&1 && break; sleep 0.2; done
    tar -C "$BUNDLE/rootfs" -cf - . | dk import - cedana-bench:1 >/dev/null
    for rt in plain cedana; do
        runtime=$rt; [ "$rt" = plain ] && runtime=runc
        dk run -d --runtime "$runtime" --name "bench-$rt" cedana-bench:1 /bin/memory "$SIZE_MIB" >/dev/null
        for _ in $(seq 600); do dk logs "bench-$rt" 2>/dev/null | grep -q '^sum ' && break; sleep 0.1; done
    done
    docker_mode() {
        local round=$1 rt=$2 t0 t1 dir
        sync; t0=$(now)
        dk checkpoint create --leave-running "bench-$rt" cp >/dev/null
        t1=$(now)
        dir=$(ls -d "$BENCH_DIR"/docker-data/containers/*/checkpoints/cp)
        record "$round" docker "docker-$rt" "$(awk -v a="$t0" -v b="$t1" "BEGIN{print b-a}")" "$(size_of "$dir")"
        dk checkpoint rm "bench-$rt" cp
    }
    echo "part 2: docker checkpoint create; $WARMUP warm-up + $ROUNDS rounds" >&2
    for r in $(seq $((1 - WARMUP)) "$ROUNDS"); do
        if [ $((r % 2)) = 1 ]; then docker_mode "$r" cedana; docker_mode "$r" plain; else docker_mode "$r" plain; docker_mode "$r" cedana; fi
    done
fi

# --- report ------------------------------------------------------------------------------------------------
python3 - "$RESULTS" <<'EOF'
import collections, statistics, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
data = collections.defaultdict(list)
for rnd, part, mode, secs, size in rows:
    if int(rnd) >= 1:  # warm-up rounds are < 1
        data[(part, mode)].append((float(secs), int(size)))
base = {"runc": "runc", "docker": "docker-plain"}
print(f"{'part':7} {'mode':14} {'median s':>9} {'min s':>7} {'max s':>7} {'size MB':>9} {'vs ' + 'baseline':>12}")
for (part, mode), v in sorted(data.items()):
    secs = [s for s, _ in v]
    med = statistics.median(secs)
    b = statistics.median(s for s, _ in data[(part, base[part])])
    print(f"{part:7} {mode:14} {med:9.3f} {min(secs):7.3f} {max(secs):7.3f} {statistics.median(z for _, z in v) / 1e6:9.1f} {med / b:11.2f}x")
EOF
