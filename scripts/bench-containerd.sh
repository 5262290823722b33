#!/usr/bin/env bash
# Benchmark containerd through our shim (io.containerd.cedana.v2) side by side with containerd's runc shim
# (io.containerd.runc.v2), on a private containerd, alternating within each round (the order flips every round):
#   1. cold start: `ctr run --rm` of a busybox rootfs printing one line, to its exit, through each shim;
#   2. checkpoint of a container holding SIZE_MIB (half pseudo-random): `ctr task checkpoint` through each shim
#      (the same command; containerd stores both in its content store; ours writes our format with `none`,
#      i.e. CRIU's images plus a manifest);
#   3. `cedana dump containerd --compression zstd` of the runc-shim container against the raw tool plus the
#      codec alone: `ctr task checkpoint --image-path D` (runc shim, CRIU images in D) + `tar | zstd -1 -T0`;
#   4. restore of a small container to its task running: `ctr container restore --live` of a `ctr container
#      checkpoint --task` through each shim, and `cedana restore containerd` (the io.cedana.restore annotation,
#      our shim) of a `cedana dump containerd`, beside the cold start of the same image;
#   5. the resident memory of one idle shim of each kind.
# Every checkpoint leaves the containers running; outputs are deleted after each round.
#
#   scripts/bench-containerd.sh        # as root; builds cedana, cedana-runc and the shim (release) first
#
# Environment: ROUNDS=5 (after WARMUP=1), SIZE_MIB=1024, STARTS=10 (cold starts and restores per round and shim),
#   BENCH_DIR=/var/tmp/cedana-bench-containerd.PID (removed unless KEEP=1), NO_BUILD=1.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
. "$HERE/lib/containerd.sh"
ROOT=$(cd "$HERE/.." && pwd)
ROUNDS=${ROUNDS:-5}
WARMUP=${WARMUP:-1}
SIZE_MIB=${SIZE_MIB:-1024}
STARTS=${STARTS:-10}
BENCH_DIR=${BENCH_DIR:-/var/tmp/cedana-bench-containerd.$$}
CEDANA=$ROOT/target/release/cedana
NS=cedana-bench

die() { echo "bench-containerd: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root"
for tool in containerd ctr runc gcc tar zstd python3 busybox; do command -v "$tool" >/dev/null || die "$tool is missing (scripts/setup.sh)"; done
[ "${NO_BUILD:-0}" = 1 ] || (cd "$ROOT" && cargo build --release --locked -p cedana -p cedana-runc -p containerd-shim-cedana-v2 >&2)
# containerd finds our shim, and the shim cedana-runc, on the PATH; our shim's checkpoints are CRIU's images
# plus a manifest (the same image format as the runc shim's).
export PATH=$ROOT/target/release:$PATH CEDANA_CHECKPOINT_COMPRESSION=none

mkdir -p "$BENCH_DIR"
RESULTS=$BENCH_DIR/results.tsv
: >"$RESULTS"
C=$BENCH_DIR/containerd
CONTAINERD_PID=
ctr_() { ctr -a "$C/containerd.sock" -n "$NS" "$@"; }

cleanup() {
    if [ -n "$CONTAINERD_PID" ]; then
        for id in $(ctr_ task ls -q 2>/dev/null); do ctr_ task kill -s SIGKILL "$id" >/dev/null 2>&1 || true; done
        sleep 0.5
        for id in $(ctr_ task ls -q 2>/dev/null); do ctr_ task rm -f "$id" >/dev/null 2>&1 || true; done
        for id in $(ctr_ containers ls -q 2>/dev/null); do ctr_ containers rm "$id" >/dev/null 2>&1 || true; done
        kill "$CONTAINERD_PID" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$CONTAINERD_PID" 2>/dev/null || break; sleep 0.2; done
        rmdir "/run/containerd/runc/$NS" 2>/dev/null || true
        for d in /sys/fs/cgroup/*/"$NS"; do [ -d "$d" ] && find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null; done || true
    fi
    [ "${KEEP:-0}" = 1 ] || rm -rf "$BENCH_DIR"
}
trap cleanup EXIT

# --- a private containerd and a busybox rootfs with the static memory workload -----------------------------
start_private_containerd "$C" || die "containerd did not start (see $C/containerd.log)"
ROOTFS=$BENCH_DIR/rootfs
busybox_rootfs "$ROOTFS"
gcc -static -O2 -o "$ROOTFS/bin/memory" "$ROOT/integration/workloads/memory.c"

# The rootfs as an image (an OCI layout tarball for `ctr image import`): `ctr container checkpoint` and
# `restore` work on containers made from images.
IMAGE=docker.io/cedana/bench:latest
python3 - "$ROOTFS" "$BENCH_DIR/image" "$IMAGE" <<'EOF'
import hashlib, json, os, subprocess, sys
rootfs, work, name = sys.argv[1:]
blobs = os.path.join(work, "layout", "blobs", "sha256")
os.makedirs(blobs)
def blob(data):
    digest = hashlib.sha256(data).hexdigest()
    open(os.path.join(blobs, digest), "wb").write(data)
    return {"digest": "sha256:" + digest, "size": len(data)}
layer = subprocess.run(["tar", "-C", rootfs, "-cf", "-", "."], check=True, capture_output=True).stdout
l = blob(layer)
config = {"architecture": "amd64", "os": "linux", "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]},
          "rootfs": {"type": "layers", "diff_ids": [l["digest"]]}}
c = blob(json.dumps(config).encode())
manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": dict(c, mediaType="application/vnd.oci.image.config.v1+json"),
            "layers": [dict(l, mediaType="application/vnd.oci.image.layer.v1.tar")]}
m = blob(json.dumps(manifest).encode())
index = {"schemaVersion": 2, "manifests": [dict(m, mediaType="application/vnd.oci.image.manifest.v1+json",
         annotations={"io.containerd.image.name": name, "org.opencontainers.image.ref.name": "latest"})]}
open(os.path.join(work, "layout", "index.json"), "w").write(json.dumps(index))
open(os.path.join(work, "layout", "oci-layout"), "w").write('{"imageLayoutVersion":"1.0.0"}')
subprocess.run(["tar", "-C", os.path.join(work, "layout"), "-cf", os.path.join(work, "image.tar"), "."], check=True)
EOF
ctr_ image import "$BENCH_DIR/image/image.tar" >/dev/null

now() { date +%s.%N; }
# record ROUND PART MODE SECONDS
record() { printf '%s\t%s\t%s\t%s\n' "$@" >>"$RESULTS"; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN{print b-a}'; }
shim_of() { case $1 in runc) echo io.containerd.runc.v2 ;; cedana) echo io.containerd.cedana.v2 ;; esac; }

# --- 1. cold start ------------------------------------------------------------------------------------------
cold_start() { # ROUND SHIM N
    local t0 out
    t0=$(now)
    out=$(ctr_ run --rm --runtime "$(shim_of "$2")" --rootfs "$ROOTFS" "start-$2-$1-$3" /bin/echo ready </dev/null)
    [ "$out" = ready ] || die "cold start through $2 printed '$out'"
    record "$1" start "$2" "$(since "$t0")"
}

# --- 2-3. checkpoints of two 1 GiB containers ---------------------------------------------------------------
start_memory() { # SHIM ID
    ctr_ run --detach --null-io --runtime "$(shim_of "$1")" --rootfs "$ROOTFS" "$2" /bin/memory "$SIZE_MIB" </dev/null
    local pid
    pid=$(ctr_ task ls | awk -v id="$2" '$1 == id {print $2}')
    # Filled when its resident size reaches the whole buffer.
    for _ in $(seq 600); do
        [ "$(awk '/^VmRSS/ {print $2}' "/proc/$pid/status")" -ge $((SIZE_MIB * 1024)) ] && return 0
        sleep 0.1
    done
    die "the workload in $2 did not fill its memory"
}
# Each `ctr task checkpoint` (no --image-path) stores a checkpoint image; drop it and its content.
drop_checkpoint_images() {
    for ref in $(ctr_ images ls -q | grep -v -e '^$' -e "^$IMAGE\$" -e '^cedana/bench-small-' || true); do
        ctr_ images rm "$ref" >/dev/null
    done
}
ctr_checkpoint() { # ROUND SHIM
    local t0
    t0=$(now)
    ctr_ task checkpoint "mem-$2" >/dev/null
    record "$1" checkpoint "ctr-$2" "$(since "$t0")"
    drop_checkpoint_images
}
cedana_zstd() { # ROUND
    local t0 d=$BENCH_DIR/out-cedana
    t0=$(now)
    "$CEDANA" dump containerd mem-runc --address "$C/containerd.sock" --namespace "$NS" --leave-running \
        --compression zstd --dir "$d" --name cp >"$BENCH_DIR/last-dump.txt"
    record "$1" zstd cedana "$(since "$t0")"
    rm -rf "$d"
}
raw_zstd() { # ROUND
    local t0 d=$BENCH_DIR/out-raw
    mkdir -p "$d/images"
    t0=$(now)
    ctr_ task checkpoint --image-path "$d/images" mem-runc >/dev/null
    tar -C "$d/images" -cf - . | zstd -q -1 -T0 -o "$d/cp.tar.zst"
    record "$1" zstd raw "$(since "$t0")"
    rm -rf "$d"
}

# --- 4. restores of a small container --------------------------------------------------------------------
SMALL='i=0; while true; do i=$((i+1)); sleep 0.2; done'
for kind in runc cedana; do
    ctr_ run --detach --null-io --runtime "$(shim_of $kind)" "$IMAGE" "small-$kind" /bin/sh -c "$SMALL" </dev/null
done
sleep 1
for kind in runc cedana; do ctr_ container checkpoint --task "small-$kind" "cedana/bench-small-$kind:1" >/dev/null; done
"$CEDANA" dump containerd small-runc --address "$C/containerd.sock" --namespace "$NS" --leave-running --compression lz4 \
    --dir "$BENCH_DIR/small" --name small >/dev/null
remove_container() { # ID
    ctr_ task kill -s SIGKILL "$1" >/dev/null 2>&1 || true
    for _ in $(seq 100); do ctr_ task rm -f "$1" >/dev/null 2>&1 && break; sleep 0.05; done
    ctr_ containers rm "$1" >/dev/null 2>&1 || true
    ctr_ snapshots rm "$1" >/dev/null 2>&1 || true
}
ctr_restore() { # ROUND SHIM N
    local t0 id="restored-$2-$1-$3"
    t0=$(now)
    ctr_ container restore --live "$id" "cedana/bench-small-$2:1" >/dev/null
    record "$1" restore "ctr-$2" "$(since "$t0")"
    remove_container "$id"
}
cedana_restore() { # ROUND N
    local t0 id="restored-cedana-$1-$2"
    t0=$(now)
    "$CEDANA" restore containerd --path "$BENCH_DIR/small/small.tar.lz4" --id "$id" --address "$C/containerd.sock" \
        --namespace "$NS" --detach 2>>"$BENCH_DIR/cedana-restore.log" || die "cedana restore containerd failed: $(tail -n 3 "$BENCH_DIR/cedana-restore.log")"
    record "$1" restore cedana "$(since "$t0")"
    remove_container "$id"
}
image_start() { # ROUND N
    local t0
    t0=$(now)
    ctr_ run --rm --runtime io.containerd.cedana.v2 "$IMAGE" "image-start-$1-$2" /bin/echo ready >/dev/null </dev/null
    record "$1" restore image-start "$(since "$t0")"
}

start_memory runc mem-runc
start_memory cedana mem-cedana

# --- 4. shim memory: the resident size of the shim serving each (idle) container ---------------------------
for kind in runc cedana; do
    pid=$(ctr_ task ls | awk -v id="mem-$kind" '$1 == id {print $2}')
    shim=$(awk '/^PPid/ {print $2}' "/proc/$pid/status")
    record 1 rss "$kind" "$(awk '/^VmRSS/ {print $2 * 1024}' "/proc/$shim/status")"
done

for round in $(seq 0 $((WARMUP + ROUNDS - 1))); do
    r=$((round - WARMUP + 1))
    [ "$r" -ge 1 ] || r=0
    if [ $((round % 2)) -eq 0 ]; then order="runc cedana"; else order="cedana runc"; fi
    for n in $(seq "$STARTS"); do for s in $order; do cold_start "$r" "$s" "$n"; done; done
    for s in $order; do ctr_checkpoint "$r" "$s"; done
    for n in $(seq "$STARTS"); do
        for s in $order; do ctr_restore "$r" "$s" "$n"; done
        cedana_restore "$r" "$n"
        image_start "$r" "$n"
    done
    if [ $((round % 2)) -eq 0 ]; then cedana_zstd "$r"; raw_zstd "$r"; else raw_zstd "$r"; cedana_zstd "$r"; fi
    echo "round $r done" >&2
done

sed -n "/timings/,\$p" "$BENCH_DIR/last-dump.txt" >&2
python3 - "$RESULTS" "$SIZE_MIB" <<'EOF'
import statistics, sys
from collections import defaultdict
rows = defaultdict(list)
for line in open(sys.argv[1]):
    r, part, mode, v = line.split("\t")
    if int(r) >= 1:
        rows[(part, mode)].append(float(v))
def med(k):
    return statistics.median(rows[k]) if rows[k] else float("nan")
def line(what, ours, theirs, unit="s"):
    a, b = rows[ours], rows[theirs]
    spread = lambda xs: f"{min(xs):.3f}-{max(xs):.3f}" if xs else "-"
    print(f"| {what} | {med(ours):.3f} ({spread(a)}) | {med(theirs):.3f} ({spread(b)}) | {med(ours) / med(theirs):.2f}x |")
print(f"containerd through our shim vs the runc shim, {sys.argv[2]} MiB workload; medians (min-max) in seconds\n")
print("| measure | ours | reference | ratio |")
print("| --- | --- | --- | --- |")
line("cold start: ctr run --rm to exit (cedana shim vs runc shim)", ("start", "cedana"), ("start", "runc"))
line("ctr task checkpoint (cedana shim vs runc shim)", ("checkpoint", "ctr-cedana"), ("checkpoint", "ctr-runc"))
line("ctr container restore --live (cedana shim vs runc shim)", ("restore", "ctr-cedana"), ("restore", "ctr-runc"))
line("cedana restore containerd --detach vs the runc shim's ctr container restore --live", ("restore", "cedana"), ("restore", "ctr-runc"))
line("cedana restore containerd --detach vs a cold ctr run --rm of the image (cedana shim)", ("restore", "cedana"), ("restore", "image-start"))
line("cedana dump containerd --compression zstd vs ctr task checkpoint + tar \\| zstd -1 -T0", ("zstd", "cedana"), ("zstd", "raw"))
rss = {m: rows[("rss", m)][0] / 2**20 for m in ("cedana", "runc") if rows[("rss", m)]}
if len(rss) == 2:
    print(f"| idle shim resident memory (MiB) | {rss['cedana']:.1f} | {rss['runc']:.1f} | {rss['cedana'] / rss['runc']:.2f}x |")
EOF
