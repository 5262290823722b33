#!/usr/bin/env bash
# Benchmark `cedana dump/restore process` against raw CRIU (and CRIU + the codec alone) on a 1 GiB process.
#
#   scripts/bench-process.sh            # as root; builds cedana (release) first; ~5 min on a quiet machine
#
# Environment:
#   ROUNDS=3            measured rounds (each round runs every mode once)
#   WARMUP=1            unmeasured warm-up rounds first (their figures are printed apart: fresh guest memory)
#   MODES="none zstd gzip lz4"   (or zlib: its codec alone is Python's zlib module, scripts/bench/zlib_pipe.py)
#                       a mode may end in :files (image files instead of streams: --no-stream) or
#                       :stream (--stream); plain names use cedana's default (streaming); :s3 dumps into an
#                       s3s-fs server on 127.0.0.1 (a multipart upload) and restores from it through nginx
#                       serving its files (ranged reads in place, as S3 answers them; scripts/lib/s3s.sh installs
#                       both once); its raw side adds the raw tool's transfer of the codec's archive (boto3's
#                       managed upload into s3s-fs and download through nginx, scripts/bench/s3_transfer.py, as
#                       `aws s3 cp` does it), and the summary compares it with the same mode to a local file
#                       (run both in one go: MODES="zstd zstd:s3")
#   SIZE_MIB=1024       workload size (half pseudo-random pages, half repeated text)
#   PROCS=1             spread SIZE_MIB over a tree of this many processes (the workload forks them)
#   GAP=0               seconds to idle before every timed step (an experiment knob: the balloon here reports
#                       free pages to the host after ~2 s; GAP=3 gave the same figures as GAP=0 when measured).
#                       The "fresh memory" effect of this VM (guest memory never touched since boot costs a
#                       host fault on first touch: a first 1 GiB dump took 2.9 s instead of 0.5 s) is what the
#                       warm-up round absorbs; its figures are printed apart.
#   RETRIES=2           a mode's raw+cedana pair during which other work ran on the machine (more than
#                       0.15 CPU-s + 2% of the step's time used by processes not ours, e.g. someone compiling or
#                       testing: see scripts/bench/monitor.py) is discarded (its rows go to disturbed.tsv in
#                       BENCH_DIR, kept with KEEP=1) and run again, up to this many times; left-overs are flagged
#   QUIET_WAIT=300      before each pair, wait up to this many seconds for 2 s with almost no foreign CPU
#   BENCH_DIR=/var/tmp/cedana-bench.PID   work folder (removed at the end unless KEEP=1)
#   RESULTS_OUT=FILE    keep the raw rows (round, mode, metric, value) there
#   CRIU=<path>         the CRIU binary (default: what cedana finds: criu on PATH, else /usr/local/sbin/criu);
#                       cedana is pointed at the same one through CEDANA_CRIU_BINARY_PATH
#   RAW_CRIU_VERBOSITY=4  -v level of raw CRIU runs (cedana always runs CRIU with -v4 and a log file)
#   CEDANA=target/release/cedana   NO_BUILD=1 skips `cargo build --release -p cedana`. The binary is copied
#                       into BENCH_DIR first, so a rebuild by someone else during the run changes nothing.
#
#   RESTORE_PAIRS=4     for --compression none: restore pairs per round on the same checkpoint (below)
#
# Every round, for every mode, alternating which side goes first:
#   raw:    criu dump -t PID -D RAW; [codec alone: tar -cf - -C RAW . | zstd -1 -T0 > F; rm RAW;
#           zstd -d -T0 < F | tar -xf - -C X]; criu restore -d -D RAW|X
#   cedana: cedana dump process PID --compression MODE; cedana restore process --path P
# For `none`, the restore comparison is then made on one and the same checkpoint (cedana's folder holds plain
# CRIU images beside its manifest): RESTORE_PAIRS times, kill the workload, `criu restore -d -D P`, kill it,
# `cedana restore process --path P` (alternating which goes first). Both sides then start from the same page
# cache and the same just-freed memory, so the pair measures our overhead and nothing else; each side's
# restore right after its own dump is still timed and reported, as "after its own dump": there a restore
# lands in memory the dump has just churned (1 GiB of new page cache, 1 GiB freed), whose cost on this VM
# swings by up to 2x from one run to the next, for both tools alike.
# CRIU restores the workload under its old PID, so the same process goes round and round. Outputs are deleted
# after each restore. Before every restore we wait until the dumped PID has been reaped; the whole script runs
# under a child subreaper (scripts/bench/reaper.c) so that takes no time (PID 1 here reaps only every ~1.5 s).
# At the end the workload checks its own memory (checksum computed at start vs now).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)

ROUNDS=${ROUNDS:-3}
WARMUP=${WARMUP:-1}
MODES=${MODES:-"none zstd gzip lz4"}
SIZE_MIB=${SIZE_MIB:-1024}
GAP=${GAP:-0}
RETRIES=${RETRIES:-2}
QUIET_WAIT=${QUIET_WAIT:-300}
RAW_CRIU_VERBOSITY=${RAW_CRIU_VERBOSITY:-4}
RESTORE_PAIRS=${RESTORE_PAIRS:-4}
CEDANA=${CEDANA:-$ROOT/target/release/cedana}

die() { echo "bench-process: $*" >&2; exit 1; }

# --- run under a child subreaper -------------------------------------------------------------------------
if [ -z "${CEDANA_BENCH_REAPER:-}" ]; then
    [ "$(id -u)" = 0 ] || die "run as root (CRIU needs it)"
    for tool in gcc tar zstd gzip lz4 python3 /usr/bin/time; do
        command -v "$tool" >/dev/null || die "$tool is missing (apt-get install ${tool##*/})"
    done
    if [ "${NO_BUILD:-0}" != 1 ]; then
        echo "== cargo build --release -p cedana" >&2
        (cd "$ROOT" && cargo build --release -p cedana) >&2
    fi
    [ -x "$CEDANA" ] || die "no cedana binary at $CEDANA"
    BENCH_DIR=${BENCH_DIR:-/var/tmp/cedana-bench.$$}
    mkdir -p "$BENCH_DIR/bin"
    cp "$CEDANA" "$BENCH_DIR/bin/cedana"
    gcc -O2 -Wall -o "$BENCH_DIR/bin/reaper" "$HERE/bench/reaper.c"
    gcc -O2 -Wall -o "$BENCH_DIR/bin/workload" "$HERE/bench/workload.c"
    export BENCH_DIR CEDANA_BENCH_REAPER=1 CEDANA_BENCH_SOURCE=$CEDANA
    exec "$BENCH_DIR/bin/reaper" bash "${BASH_SOURCE[0]}" "$@"
fi

if [ -z "${CRIU:-}" ]; then
    CRIU=$(command -v criu || true)
    [ -n "$CRIU" ] || CRIU=/usr/local/sbin/criu
fi
[ -x "$CRIU" ] || die "no CRIU at $CRIU (run scripts/setup.sh)"
export CEDANA_CRIU_BINARY_PATH=$CRIU
CEDANA=$BENCH_DIR/bin/cedana

WORK=$BENCH_DIR
LOGS=$WORK/logs          # CRIU logs of the raw runs: outside the images folder
CED=$WORK/ced            # cedana checkpoints
RES=$WORK/results.tsv    # accepted rows
PAIR=$WORK/pair.tsv      # rows of the pair being run
MON=$WORK/monitor.log
mkdir -p "$LOGS" "$CED"
: >"$RES"
: >"$WORK/disturbed.tsv"
WPID=
MONPID=
S3S_PID=
NGINX_PID=

cleanup() {
    local rc=$?
    if [ -n "$WPID" ] && [ -e "/proc/$WPID" ] && [ "$(cat "/proc/$WPID/comm" 2>/dev/null)" = workload ]; then
        kill -KILL -- -"$WPID" 2>/dev/null || true # its process group: the whole tree
        for ((i = 0; i < 200; i++)); do [ -e "/proc/$WPID" ] || break; sleep 0.01; done # reaped by our reaper
    fi
    if [ -n "$MONPID" ]; then kill "$MONPID" 2>/dev/null || true; fi
    if [ -n "$S3S_PID" ]; then kill "$S3S_PID" 2>/dev/null || true; fi
    if [ -n "$NGINX_PID" ]; then kill "$NGINX_PID" 2>/dev/null || true; fi
    if [ -n "${RESULTS_OUT:-}" ] && [ -s "$RES" ]; then cp "$RES" "$RESULTS_OUT"; fi
    if [ "${KEEP:-0}" = 1 ]; then
        echo "kept $WORK" >&2
    else
        rm -rf "$WORK"
    fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

# --- helpers -----------------------------------------------------------------------------------------------
now() { date +%s.%N; }
fsub() { python3 -c "import sys; print(f'{float(sys.argv[1]) - float(sys.argv[2]):.6f}')" "$1" "$2"; }
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$PAIR"; }
size_of() { du -sb "$1" | cut -f1; }
DISTURBED=0

# timed ROUND MODE KEY CMD...: run CMD, record its wall time, its CPU time (its own and its reaped children's),
# and what else ran on the machine meanwhile (from the monitor). CMD's stdout is left in $WORK/last.out.
timed() {
    local round=$1 mode=$2 key=$3; shift 3
    if [ "$GAP" != 0 ]; then sleep "$GAP"; fi
    local t0 t1 usr sys rss wall
    t0=$(now)
    if ! /usr/bin/time -f '%U %S %M' -o "$WORK/time.out" "$@" >"$WORK/last.out" 2>"$WORK/last.err"; then
        echo "bench-process: FAILED in round $round, mode $mode, step $key: $*" >&2
        cat "$WORK/last.out" "$WORK/last.err" >&2
        exit 1
    fi
    t1=$(now)
    read -r usr sys rss < <(tail -n 1 "$WORK/time.out")
    wall=$(fsub "$t1" "$t0")
    sleep 0.25 # let the monitor write the sample that covers the end of the step
    local foreign comp who
    read -r foreign comp who < <(awk -v a="$t0" -v b="$t1" '
        $1 > a && $1 <= b + 0.25 { f += $2; if ($3 > c) c = $3; if ($2 > m) { m = $2; w = $4 } }
        END { printf "%.2f %d %s\n", f, c, (w == "" ? "-" : w) }' "$MON")
    record "$round" "$mode" "$key.wall" "$wall"
    record "$round" "$mode" "$key.cpu" "$(python3 -c "print(round($usr + $sys, 2))")"
    record "$round" "$mode" "$key.foreign" "$foreign"
    record "$round" "$mode" "$key.rss" "$rss" # KiB: the peak of the command or of any child it waited for
    record "$round" "$mode" "$key.compilers" "$comp"
    local note=""
    if python3 -c "import sys; sys.exit(0 if $foreign > 0.15 + 0.02 * $wall else 1)"; then
        DISTURBED=1
        note="  <- disturbed: foreign CPU ${foreign}s (mostly $who), compilers $comp"
    fi
    printf '  r%s %-5s %-12s %7.3f s%s\n' "$round" "$mode" "$key" "$wall" "$note" >&2
}

# Wait until the dumped workload's PIDs are gone (not even zombies), as CRIU restores it under them.
wait_gone() {
    local i
    for ((i = 0; i < 1000; i++)); do
        if [ ! -e "/proc/$WPID" ] && [ -z "$(pgrep -g "$WPID")" ]; then return 0; fi
        sleep 0.01
    done
    die "PID $WPID still exists 10 s after the dump ($(grep -E '^(State|PPid)' "/proc/$WPID/status" 2>/dev/null | tr '\n' ' '))"
}

# Wait (up to QUIET_WAIT s) until the monitor has seen 2 s with less than 0.1 CPU-s of foreign work.
wait_quiet() {
    local i
    for ((i = 0; i < QUIET_WAIT * 2; i++)); do
        if tail -n 10 "$MON" 2>/dev/null | awk '{ n++; f += $2 } END { exit !(n == 10 && f < 0.1) }'; then
            return 0
        fi
        ((i % 60 == 0)) && echo "  (other work is running: waiting up to ${QUIET_WAIT}s for a quiet machine; last: $(tail -n 1 "$MON" 2>/dev/null))" >&2
        sleep 0.5
    done
}

check_alive() {
    [ "$(cat "/proc/$WPID/comm" 2>/dev/null)" = workload ] || die "$1: PID $WPID is not a running workload"
    case "$(awk '{print $3}' "/proc/$WPID/stat")" in
        S | R) ;;
        *) die "$1: PID $WPID is in state $(awk '{print $3}' "/proc/$WPID/stat")" ;;
    esac
}

codec_c() { # MODE SRC_DIR OUT_FILE
    case $1 in
        zstd) tar -cf - -C "$2" . | zstd -q -1 -T0 >"$3" ;;
        gzip) tar -cf - -C "$2" . | gzip -1 >"$3" ;;
        lz4) tar -cf - -C "$2" . | lz4 -q -1 -B7 >"$3" ;;
        zlib) tar -cf - -C "$2" . | python3 "$HERE/bench/zlib_pipe.py" -1 >"$3" ;;
    esac
}
codec_d() { # MODE IN_FILE OUT_DIR
    mkdir -p "$3"
    case $1 in
        zstd) zstd -q -d -T0 <"$2" | tar -xf - -C "$3" ;;
        gzip) gzip -d <"$2" | tar -xf - -C "$3" ;;
        lz4) lz4 -q -d <"$2" | tar -xf - -C "$3" ;;
        zlib) python3 "$HERE/bench/zlib_pipe.py" -d <"$2" | tar -xf - -C "$3" ;;
    esac
}
export HERE
export -f codec_c codec_d

raw_pair() { # ROUND MODE
    local r=$1 m=$2 c=${2%%:*} img=$WORK/raw-images dir
    mkdir -p "$img"
    timed "$r" "$m" raw.dump "$CRIU" dump -t "$WPID" -D "$img" -o "$LOGS/dump.log" -v"$RAW_CRIU_VERBOSITY"
    python3 "$HERE/bench/summarize.py" --stats "$img/stats-dump" | while read -r k v; do record "$r" "$m" "raw.dump.$k" "$v"; done
    record "$r" "$m" raw.images.size "$(size_of "$img")"
    dir=$img
    if [ "$c" != none ]; then
        timed "$r" "$m" codec.c bash -o pipefail -c 'codec_c "$@"' _ "$c" "$img" "$WORK/raw.archive"
        record "$r" "$m" codec.size "$(stat -c %s "$WORK/raw.archive")"
        timed "$r" "$m" rm.images rm -rf "$img" # for comparison: cedana deletes its staging folder within its dump
        if [[ $m == *:s3 ]]; then
            timed "$r" "$m" raw.upload env AWS_ENDPOINT_URL="$DUMP_ENDPOINT" "$MOTO_PYTHON" "$HERE/bench/s3_transfer.py" \
                up "$WORK/raw.archive" bench "raw/r$r"
            rm -f "$WORK/raw.archive"
            timed "$r" "$m" raw.download env AWS_ENDPOINT_URL="$RANGE_ENDPOINT" "$MOTO_PYTHON" "$HERE/bench/s3_transfer.py" \
                down bench "raw/r$r" "$WORK/raw.archive"
            rm -f "$WORK/s3/data/bench/raw/r$r"
        fi
        timed "$r" "$m" codec.d bash -o pipefail -c 'codec_d "$@"' _ "$c" "$WORK/raw.archive" "$WORK/raw-extracted"
        rm -f "$WORK/raw.archive"
        dir=$WORK/raw-extracted
    fi
    wait_gone
    timed "$r" "$m" "$(restore_key raw "$r" "$m")" "$CRIU" restore -d -D "$dir" -o "$LOGS/restore.log" -v"$RAW_CRIU_VERBOSITY" </dev/null
    check_alive "raw restore ($m, round $r)"
    rm -rf "$img" "$WORK/raw-extracted"
}

ced_pair() { # ROUND MODE
    local r=$1 m=$2 name=bench-r$1-${2//:/-} path dir=$CED file envs=()
    [[ $m == *:s3 ]] && dir=s3://bench/ckpt envs=(env AWS_ENDPOINT_URL="$DUMP_ENDPOINT")
    timed "$r" "$m" ced.dump "${envs[@]}" "$CEDANA" dump process "$WPID" --dir "$dir" \
        --name "$name" --compression "${m%%:*}" $(stream_flag "$m")
    python3 "$HERE/bench/summarize.py" --cedana-dump "$WORK/last.out" | while read -r k v; do record "$r" "$m" "ced.dump.$k" "$v"; done
    path=$(sed -n 's/^Dumped PID [0-9]* (.*) to //p' "$WORK/last.out")
    file=$path
    [[ $m == *:s3 ]] && file=$WORK/s3/data/${path#s3://}
    [ -e "$file" ] || die "cedana dump printed no checkpoint path: $(cat "$WORK/last.out")"
    record "$r" "$m" ced.size "$(size_of "$file")"
    wait_gone
    ced_restore "$r" "$m" "$(restore_key ced "$r" "$m")" "$path"
    if [ "$(restore_key ced "$r" "$m")" = ced.restore ]; then rm -rf "$file"; else KEPT=$path; fi
}

# restore_key SIDE ROUND MODE: the metric of a restore right after its own dump (`none` with restore pairs:
# reported apart, the restore comparison being made by restore_pairs).
restore_key() {
    if [ "$3" = none ] && ((RESTORE_PAIRS > 0 && $2 > 0)); then echo "$1.restore.afterdump"; else echo "$1.restore"; fi
}

# stream_flag MODE: `zstd` streams images between CRIU and the archive (the default), `zstd:files` goes through
# image files (CRIU writes a folder that is packed as it grows; a restore extracts the archive first).
stream_flag() {
    case $1 in *:files) echo --no-stream ;; *:stream) echo --stream ;; esac
}

ced_restore() { # ROUND MODE KEY PATH
    local envs=()
    [[ $2 == *:s3 ]] && envs=(env AWS_ENDPOINT_URL="$RANGE_ENDPOINT")
    timed "$1" "$2" "$3" "${envs[@]}" "$CEDANA" restore process --path "$4" $(stream_flag "$2") </dev/null
    python3 "$HERE/bench/summarize.py" --cedana-restore "$WORK/last.out" | while read -r k v; do record "$1" "$2" "$3.$k" "$v"; done
    grep -q "^Restored PID $WPID " "$WORK/last.out" || die "cedana restore: unexpected output: $(cat "$WORK/last.out")"
    check_alive "cedana restore ($2, round $1)"
}

# restore_pairs ROUND PATH: raw CRIU and cedana restore the same `none` checkpoint by turns. Pair k of round r
# is recorded under round r*100+k. The workload is left running, restored.
restore_pairs() {
    local r=$1 path=$2 k key side
    for ((k = 1; k <= RESTORE_PAIRS; k++)); do
        key=$((r * 100 + k))
        for side in $( (((r + k) % 2)) && echo "raw ced" || echo "ced raw"); do
            kill -KILL -- -"$WPID" # its process group: the whole tree
            wait_gone
            if [ "$side" = raw ]; then
                timed "$key" none raw.restore "$CRIU" restore -d -D "$path" -o "$LOGS/restore.log" -v"$RAW_CRIU_VERBOSITY" </dev/null
                check_alive "raw restore (restore pair $k, round $r)"
            else
                ced_restore "$key" none ced.restore "$path"
            fi
        done
    done
    rm -rf "$path"
}

# --- the run -----------------------------------------------------------------------------------------------
if [[ " $MODES " == *":s3 "* ]]; then
    # shellcheck source=lib/s3s.sh
    source "$HERE/lib/s3s.sh"
    ensure_s3s_fs || die "cannot install s3s-fs"
    ensure_nginx || die "cannot install nginx"
    start_s3s_fs "$WORK/s3" bench || die "s3s-fs does not answer (see $WORK/s3/s3s.log)"
    DUMP_ENDPOINT=$AWS_ENDPOINT_URL
    start_range_reader "$WORK/s3" || die "nginx does not answer (see $WORK/s3/nginx/error.log)"
    MOTO_PYTHON=${CEDANA_MOTO_VENV:-/opt/cedana/moto}/bin/python # boto3 comes with moto (scripts/setup.sh)
    "$MOTO_PYTHON" -c 'import boto3' || die "no boto3 in $MOTO_PYTHON (run scripts/setup.sh)"
fi

python3 "$HERE/bench/monitor.py" "$PPID" "$MON" 0.2 &
MONPID=$!

rev=$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo '?')
dirty=$(cd "$ROOT" && git status --porcelain --untracked-files=no -- cedana 2>/dev/null | wc -l)
{
    echo "# $(date -u +%FT%TZ)  $(uname -r)  $(nproc) cores  criu $("$CRIU" --version | sed -n 's/^Version: //p')"
    echo "# cedana: $CEDANA_BENCH_SOURCE built $(date -u -r "$CEDANA_BENCH_SOURCE" +%FT%TZ), git $rev$( ((dirty > 0)) && echo " + $dirty modified files under cedana/"), sha256 $(sha256sum "$CEDANA" | cut -c1-12)"
    echo "# rounds=$ROUNDS warmup=$WARMUP modes='$MODES' size=${SIZE_MIB}MiB gap=${GAP}s retries=$RETRIES restore-pairs=$RESTORE_PAIRS raw-criu -v$RAW_CRIU_VERBOSITY dir=$WORK"
    echo "# load at start: $(cat /proc/loadavg)"
} | tee "$WORK/header.txt" >&2

WORKLOAD_PROCS=${PROCS:-1} setsid "$WORK/bin/workload" "$SIZE_MIB" "$WORK/workload.pid" "$WORK/workload.sum" </dev/null >/dev/null 2>&1 &
disown
for ((i = 0; i < 6000; i++)); do [ -s "$WORK/workload.pid" ] && break; sleep 0.01; done
WPID=$(cat "$WORK/workload.pid" 2>/dev/null) || die "the workload did not start"
check_alive "workload start"
echo "# workload PID $WPID, RSS $(awk '/VmRSS/{print $2, $3}' "/proc/$WPID/status")" | tee -a "$WORK/header.txt" >&2

total=$((WARMUP + ROUNDS))
redone=0
for ((n = 0; n < total; n++)); do
    if ((n < WARMUP)); then r=0; else r=$((n - WARMUP + 1)); fi
    echo "== round $r$( ((r == 0)) && echo ' (warm-up)'), load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
    for m in $MODES; do
        for ((attempt = 0; ; attempt++)); do
            wait_quiet
            : >"$PAIR"
            DISTURBED=0
            KEPT=
            if ((n % 2 == 0)); then
                raw_pair "$r" "$m"
                ced_pair "$r" "$m"
            else
                ced_pair "$r" "$m"
                raw_pair "$r" "$m"
            fi
            if [ -n "$KEPT" ]; then restore_pairs "$r" "$KEPT"; fi
            if ((DISTURBED == 0 || r == 0)); then break; fi
            awk -v a="$attempt" '{print $0 "\tattempt " a}' "$PAIR" >>"$WORK/disturbed.tsv"
            if ((attempt >= RETRIES)); then
                echo "  (still disturbed after $RETRIES retries: keeping these figures, flagged)" >&2
                break
            fi
            redone=$((redone + 1))
            echo "  (the machine was busy: running round $r, $m again)" >&2
        done
        cat "$PAIR" >>"$RES"
    done
done

# The restored workload must still hold exactly the bytes it wrote at start.
rm -f "$WORK/workload.sum"
kill -USR1 "$WPID"
for ((i = 0; i < 3000; i++)); do [ -s "$WORK/workload.sum" ] && break; sleep 0.01; done
read -r want got <"$WORK/workload.sum" || die "the workload wrote no checksum"
[ "$want" = "$got" ] || die "the restored workload's memory changed: checksum $got, expected $want"
{
    echo "# workload memory intact after all restores (checksum $got); pairs run again because the machine was busy: $redone"
    echo "# load at end: $(cat /proc/loadavg)"
} | tee -a "$WORK/header.txt" >&2

cat "$WORK/header.txt"
python3 "$HERE/bench/summarize.py" --table "$RES"
