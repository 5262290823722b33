#!/usr/bin/env bash
# Benchmark lazy restores (`cedana restore process --lazy`) against raw CRIU and a normal cedana restore, on
# one checkpoint of a 1 GiB process (half pseudo-random, half repeated text).
#
#   scripts/bench-lazy.sh            # as root; builds cedana (release) first
#
# Environment: ROUNDS=3, SIZE_MIB=1024, CRIU=<criu binary>, NO_BUILD=1 (skip the release build),
#   CEDANA=target/release/cedana, BENCH_DIR=/var/tmp/cedana-lazy.PID (removed unless KEEP=1),
#   KDAT_CACHE=1: run in a mount namespace of its own with a tmpfs on /run, so that CRIU keeps its cache of
#   the kernel's features as it does on hosts whose /run is a tmpfs (this VM's /run is not: every CRIU run
#   probes the kernel again, about 30 ms, raw CRIU's and cedana's alike),
#   BASE=<another cedana binary>: also its lazy restores of the zstd and tar archives (modes lazy-zstd-base,
#   lazy-tar-base), in the same rounds: two builds side by side,
#   PROGRESS=0: skip the first-100-ms part; PROGRESS_ONLY=1: only that part; WALKS="sequential random": its
#   walks (see below),
#   S3=1: also from an object store: the zstd checkpoint is dumped into an s3s-fs server on 127.0.0.1 too
#   (the S3 API: a multipart upload), and restored from it through nginx serving s3s-fs's files (GET and
#   HEAD, ranges read in place, as S3 serves them; see scripts/lib/s3s.sh, which installs both once): normally
#   (streamed by ranged reads) and lazily (one ranged read per 8 MiB piece, as the program needs it), against
#   a whole-object GET of it by curl. moto and s3s-fs themselves read an object from its start for every
#   ranged read.
#
# The workload is dumped once by cedana into a folder (`--compression none`: plain CRIU images beside our
# manifest, so raw CRIU restores it as it is), once into an uncompressed archive (`tar`) and once into a zstd
# one. Every round, in an order that rotates, each of these restores it and the workload is killed again:
#   raw             criu restore -d -D FOLDER                          (the program runs when it returns)
#   normal[-F]      cedana restore process --path CKPT --detach       (verified, then restored)
#   lazy[-F]        cedana restore process --path CKPT --lazy         (running after: from its report;
#                                                                        wholly local: when it returns)
# with CKPT the folder, or the archive of format F (tar, zstd). Reported: medians; time to running of each
# lazy restore against raw CRIU's restore, and its time to wholly local against a normal cedana restore of
# the same checkpoint. Whole-process wall times except "running after", which is the
# time from the start of cedana's restore pipeline to CRIU returning with the program running (cedana's
# own start-up, about 2 ms, comes on top). At the end the workload checks its own memory.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
ROUNDS=${ROUNDS:-3}
SIZE_MIB=${SIZE_MIB:-1024}
CEDANA=${CEDANA:-$ROOT/target/release/cedana}

die() { echo "bench-lazy: $*" >&2; exit 1; }

if [ -z "${CEDANA_BENCH_REAPER:-}" ]; then
    [ "$(id -u)" = 0 ] || die "run as root (CRIU needs it)"
    if [ "${NO_BUILD:-0}" != 1 ]; then
        (cd "$ROOT" && cargo build --release -p cedana) >&2
    fi
    [ -x "$CEDANA" ] || die "no cedana binary at $CEDANA"
    if [ "${S3:-0}" = 1 ]; then
        # shellcheck source=lib/s3s.sh
        source "$HERE/lib/s3s.sh"
        ensure_s3s_fs || die "cannot install s3s-fs"
        ensure_nginx || die "cannot unpack nginx"
    fi
    BENCH_DIR=${BENCH_DIR:-/var/tmp/cedana-lazy.$$}
    mkdir -p "$BENCH_DIR/bin"
    cp "$CEDANA" "$BENCH_DIR/bin/cedana"
    if [ -n "${BASE:-}" ]; then cp "$BASE" "$BENCH_DIR/bin/cedana-base"; fi
    gcc -O2 -Wall -o "$BENCH_DIR/bin/reaper" "$HERE/bench/reaper.c"
    gcc -O2 -Wall -o "$BENCH_DIR/bin/workload" "$HERE/bench/workload.c"
    gcc -O2 -Wall -o "$BENCH_DIR/bin/progress" "$HERE/bench/progress.c"
    export BENCH_DIR CEDANA_BENCH_REAPER=1
    if [ "${KDAT_CACHE:-0}" = 1 ]; then
        # In a mount namespace of its own with a tmpfs on /run, where CRIU keeps its cache of the kernel's
        # features (criu.kdat) as on hosts whose /run is a tmpfs (systemd's): every CRIU run after the first
        # skips probing the kernel again (about 30 ms here).
        exec unshare --mount --propagation private bash -c 'mount -t tmpfs -o size=4m cedana-bench-run /run && exec "$@"' \
            bench "$BENCH_DIR/bin/reaper" bash "${BASH_SOURCE[0]}" "$@"
    fi
    exec "$BENCH_DIR/bin/reaper" bash "${BASH_SOURCE[0]}" "$@"
fi

if [ -z "${CRIU:-}" ]; then
    CRIU=$(command -v criu || true)
    [ -n "$CRIU" ] || CRIU=/usr/local/sbin/criu
fi
export CEDANA_CRIU_BINARY_PATH=$CRIU CEDANA_LOG_LEVEL=warn
# A scratch folder of the bench's own: lazy restores keep the page order they record there.
export CEDANA_CHECKPOINT_SCRATCH_DIR=$BENCH_DIR/scratch
CEDANA=$BENCH_DIR/bin/cedana
WORK=$BENCH_DIR
RES=$WORK/results.tsv
: >"$RES"
WPID=

S3S_PID=
cleanup() {
    local rc=$?
    if [ -n "$S3S_PID" ]; then kill "$S3S_PID" 2>/dev/null || true; fi
    if [ -n "${NGINX_PID:-}" ]; then kill "$NGINX_PID" 2>/dev/null || true; fi
    if [ -n "$WPID" ] && [ "$(cat "/proc/$WPID/comm" 2>/dev/null)" = workload ]; then kill -KILL "$WPID" || true; fi
    if [ "${KEEP:-0}" = 1 ]; then echo "kept $WORK" >&2; else rm -rf "$WORK"; fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

now() { date +%s.%N; }
wait_gone() {
    for ((i = 0; i < 1000; i++)); do [ -e "/proc/$WPID" ] || return 0; sleep 0.01; done
    die "PID $WPID still exists 10 s after it was killed"
}
end_restored() {
    [ "$(cat "/proc/$WPID/comm" 2>/dev/null)" = workload ] || die "$1: PID $WPID is not a running workload"
    kill -KILL "$WPID"
    wait_gone
}
# timed MODE CMD...: wall time of CMD into results (its stdout in $WORK/last.out).
timed() {
    local mode=$1; shift
    local t0 t1
    t0=$(now)
    "$@" >"$WORK/last.out" 2>"$WORK/last.err" </dev/null || { cat "$WORK/last.out" "$WORK/last.err" >&2; die "$mode failed: $*"; }
    t1=$(now)
    python3 -c "import sys; print(f'{sys.argv[1]}\twall\t{float(sys.argv[3]) - float(sys.argv[2]):.4f}')" "$mode" "$t0" "$t1" >>"$RES"
}

echo "# $(date -u +%FT%TZ)  $(uname -r)  $(nproc) cores  criu $("$CRIU" --version | sed -n 's/^Version: //p')  ${SIZE_MIB} MiB  $ROUNDS rounds  kdat cache: $([ "${KDAT_CACHE:-0}" = 1 ] && echo kept || echo none)" >&2
setsid "$WORK/bin/workload" "$SIZE_MIB" "$WORK/workload.pid" "$WORK/workload.sum" </dev/null >/dev/null 2>&1 &
for ((i = 0; i < 600; i++)); do [ -s "$WORK/workload.pid" ] && break; sleep 0.1; done
WPID=$(cat "$WORK/workload.pid")
"$CEDANA" dump process "$WPID" --dir "$WORK/ckpt" --name folder --compression none --leave-running >/dev/null
"$CEDANA" dump process "$WPID" --dir "$WORK/ckpt" --name archive --compression tar --leave-running >/dev/null
if [ "${S3:-0}" = 1 ]; then
    # shellcheck source=lib/s3s.sh
    source "$HERE/lib/s3s.sh"
    start_s3s_fs "$WORK/s3" bench || die "s3s-fs does not answer (see $WORK/s3/s3s.log)"
    "$CEDANA" dump process "$WPID" --dir s3://bench/ckpt --name archive --compression zstd --leave-running >/dev/null
    start_range_reader "$WORK/s3" || die "nginx does not answer (see $WORK/s3/nginx/error.log)"
    export AWS_ENDPOINT_URL=$RANGE_ENDPOINT
fi
"$CEDANA" dump process "$WPID" --dir "$WORK/ckpt" --name archive --compression zstd >/dev/null
wait_gone
FOLDER=$WORK/ckpt/folder
ARCHIVE=$WORK/ckpt/archive.tar
ZSTD=$WORK/ckpt/archive.tar.zst

path_of() {
    case $1 in
        *-tar | *-tar-base) echo "$ARCHIVE" ;;
        *-zstd | *-zstd-base) echo "$ZSTD" ;;
        *-s3) echo "s3://bench/ckpt/archive.tar.zst" ;;
        *) echo "$FOLDER" ;;
    esac
}

run_mode() {
    local p
    p=$(path_of "$1")
    case $1 in
        raw) timed raw "$CRIU" restore -d -D "$FOLDER" -o "$WORK/raw-restore.log" -v4 ;;
        get-s3)
            timed get-s3 curl -sf -o /dev/null "$RANGE_ENDPOINT/bench/ckpt/archive.tar.zst"
            return
            ;;
        normal*) timed "$1" "$CEDANA" restore process --path "$p" --detach ;;
        lazy*)
            local bin=$CEDANA
            [[ $1 == *-base ]] && bin=$WORK/bin/cedana-base
            timed "$1" "$bin" restore process --path "$p" --detach --lazy --output json
            python3 -c "import json,sys; l=json.loads(open(sys.argv[1]).read().splitlines()[-1])['lazy']; print(f\"{sys.argv[2]}\trunning\t{l['running_after_ms']/1000:.4f}\")" "$WORK/last.out" "$1" >>"$RES"
            ;;
    esac
    end_restored "$1"
}

MODES=(raw normal lazy normal-tar lazy-tar normal-zstd lazy-zstd)
[ "${PROGRESS_ONLY:-0}" = 1 ] && MODES=()
[ "${S3:-0}" = 1 ] && MODES+=(get-s3 normal-s3 lazy-s3)
[ -n "${BASE:-}" ] && MODES+=(lazy-tar-base lazy-zstd-base)
for ((r = 0; r < ROUNDS && ${#MODES[@]} > 0; r++)); do
    for ((k = 0; k < ${#MODES[@]}; k++)); do
        m=${MODES[$(((k + r) % ${#MODES[@]}))]}
        before=$(wc -l <"$RES")
        run_mode "$m"
        tail -n +"$((before + 1))" "$RES" | cut -f2- | sed "s/^/  r$r $m /" >&2
    done
done

# The memory after a lazy restore from the zstd archive: the workload compares its checksum.
"$CEDANA" restore process --path "$ZSTD" --detach --lazy >/dev/null
rm -f "$WORK/workload.sum"
kill -USR1 "$WPID"
for ((i = 0; i < 100; i++)); do [ -s "$WORK/workload.sum" ] && break; sleep 0.1; done
read -r expected actual <"$WORK/workload.sum"
[ "$expected" = "$actual" ] || die "the lazily restored workload's memory differs: $expected vs $actual"
echo "memory after a lazy restore: checksum $actual as at start" >&2
end_restored check

# The first 100 ms: the workload walking its pages (one read a page, without end, counting them in a shared
# file), in sequence and (WORKLOAD_WALK=random) scattered over its memory, dumped once into zstd, then restored
# in turn while a sampler reads its count every 2 ms from the start of the restore: lazily with no recorded
# page order (the order file removed first: this restore records it), lazily again with the order the previous
# one recorded (its blocks brought first), and normally. Reported: when it first moved, and how many pages it
# touched in its first 100 ms of running, against the same program with its memory local.
if [ "${PROGRESS:-1}" = 1 ]; then
    PROG=$WORK/walk.progress
    ORDERS=$CEDANA_CHECKPOINT_SCRATCH_DIR/.cedana-page-order
    for walk in ${WALKS:-sequential random}; do
        rm -f "$WORK/workload.pid" "$PROG" "$WORK/ckpt/walker.tar.zst"
        WORKLOAD_WALK=$walk setsid "$WORK/bin/workload" "$SIZE_MIB" "$WORK/workload.pid" "$WORK/workload.sum" "$PROG" </dev/null >/dev/null 2>&1 &
        for ((i = 0; i < 600; i++)); do [ -s "$WORK/workload.pid" ] && break; sleep 0.1; done
        WPID=$(cat "$WORK/workload.pid")
        sleep 0.3
        "$WORK/bin/progress" "$PROG" 300 >"$WORK/$walk.local.samples"
        "$CEDANA" dump process "$WPID" --dir "$WORK/ckpt" --name walker --compression zstd >/dev/null
        wait_gone
        cp "$PROG" "$WORK/$walk.at-dump"
        for ((r = 0; r < ROUNDS; r++)); do
            for kind in lazy lazy-ordered normal; do
                cp "$WORK/$walk.at-dump" "$PROG"
                [ "$kind" = lazy ] && rm -rf "$ORDERS"
                "$WORK/bin/progress" "$PROG" 3000 >"$WORK/$walk.$kind.$r.samples" &
                SAMPLER=$!
                flag=()
                [ "$kind" != normal ] && flag=(--lazy)
                "$CEDANA" restore process --path "$WORK/ckpt/walker.tar.zst" --detach "${flag[@]}" --output json \
                    >"$WORK/$walk.$kind.$r.json" </dev/null
                wait "$SAMPLER"
                end_restored "walker-$kind"
            done
        done
    done
    python3 - "$WORK" "$ROUNDS" "$SIZE_MIB" "${WALKS:-sequential random}" <<'PY'
import json, statistics, struct, sys
work, rounds, mib, walks = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4].split()
pages = mib * 256
def samples(path):
    return [(float(t), int(c)) for t, c in (l.split() for l in open(path))]
def count_at(s, t):
    before = [c for ts, c in s if ts <= t]
    return before[-1] if before else s[0][1]
for walk in walks:
    at_dump = struct.unpack("<Q", open(f"{work}/{walk}.at-dump", "rb").read(8))[0]
    local = samples(f"{work}/{walk}.local.samples")
    local_100 = statistics.median(count_at(local, t + 100) - count_at(local, t) for t in (0, 50, 100, 150, 200))
    print(f"first 100 ms of running (the workload reading its {mib} MiB page by page, {walk} walk, zstd checkpoint, {rounds} rounds):")
    print(f"  memory local (before the dump): {local_100:,.0f} page reads in 100 ms")
    for kind in ("lazy", "lazy-ordered", "normal"):
        moved, did, ordered = [], [], []
        for r in range(rounds):
            s = samples(f"{work}/{walk}.{kind}.{r}.samples")
            start = next((t for t, c in s if c > at_dump), None)
            if start is None:
                continue
            moved.append(start)
            did.append(count_at(s, start + 100) - at_dump)
            lazy = json.loads(open(f"{work}/{walk}.{kind}.{r}.json").read().splitlines()[-1]).get("lazy") or {}
            ordered.append(lazy.get("ordered_pages", 0))
        if not moved:
            print(f"  {kind}: never ran within the sampling window")
            continue
        d = statistics.median(did)
        extra = f"; {statistics.median(ordered):,.0f} pages brought in the recorded order" if kind == "lazy-ordered" else ""
        print(f"  {kind:<12}: running {statistics.median(moved) / 1000:.3f} s after the restore began; in its first 100 ms "
              f"{d:,.0f} page reads, {d / local_100:.1%} of the local rate (rounds: {', '.join(f'{x:,}' for x in did)}){extra}")
PY
fi

[ "${PROGRESS_ONLY:-0}" = 1 ] && exit 0
python3 - "$RES" "${S3:-0}" "${BASE:+1}" <<'PY'
import statistics, sys
rows = [l.split("\t") for l in open(sys.argv[1]).read().splitlines()]
def med(mode, metric):
    v = [float(x[2]) for x in rows if x[0] == mode and x[1] == metric]
    return statistics.median(v), min(v), max(v)
print(f"{'restore':<34}{'median s':>10}{'min':>8}{'max':>8}")
lines = [("raw", "wall", "raw criu restore (folder)")]
formats = [("", "folder"), ("-tar", "tar"), ("-zstd", "zstd")] + ([("-s3", "zstd in S3")] if sys.argv[2] == "1" else [])
for f, name in formats:
    lines += [(f"normal{f}", "wall", f"cedana restore ({name})"), (f"lazy{f}", "running", f"lazy ({name}): running"),
              (f"lazy{f}", "wall", f"lazy ({name}): wholly local")]
for mode, metric, label in lines:
    m, lo, hi = med(mode, metric)
    print(f"{label:<34}{m:>10.3f}{lo:>8.3f}{hi:>8.3f}")
raw = med("raw", "wall")[0]
if sys.argv[2] == "1":
    m, lo, hi = med("get-s3", "wall")
    print(f"{'GET of the whole object (curl)':<34}{m:>10.3f}{lo:>8.3f}{hi:>8.3f}")
    print(f"lazy-s3: wholly local {med('lazy-s3', 'wall')[0] / m:.2f}x the GET of the whole object alone")
if sys.argv[3] == "1":
    for f, name in [("-tar", "tar"), ("-zstd", "zstd")]:
        m, lo, hi = med(f"lazy{f}-base", "running")
        print(f"{'BASE lazy (' + name + '): running':<34}{m:>10.3f}{lo:>8.3f}{hi:>8.3f}")
        print(f"lazy{f}: time to running {med('lazy' + f, 'running')[0] / m:.2f}x BASE's; BASE's {m / raw:.2f}x raw criu restore")
for f, _ in formats:
    print(f"lazy{f or ' (folder)'}: time to running {med('lazy' + f, 'running')[0] / raw:.2f}x raw criu restore; "
          f"time to wholly local {med('lazy' + f, 'wall')[0] / med('normal' + f, 'wall')[0]:.2f}x a normal cedana restore of it")
PY
