#!/usr/bin/env bash
# Benchmark the two CRIU drivers against each other on a 1 GiB process: `criu dump/restore` run as commands
# with action scripts (CliDriver) vs `criu swrk` spoken to over its RPC socket (SwrkDriver).
#
#   scripts/bench-criu-driver.sh        # as root; builds the example (release) first
#
# Every round runs, for each driver (which goes first alternates from round to round):
#   criu_drivers dump --driver D --pid PID --dir IMG; wait until PID is gone; criu_drivers restore --driver D
#   --dir IMG; check the workload runs again; delete IMG.
# The time measured is the driver call alone (the example prints it: from the call to its return, CRIU's
# start-up, notifications and exit included). CRIU restores the workload under its old PID, so the same
# process goes round and round; the whole script runs under a child subreaper (scripts/bench/reaper.c) so a
# dumped PID is reaped at once. At the end the workload checks its own memory (checksum at start vs now).
#
# Environment:
#   ROUNDS=5          measured rounds
#   WARMUP=1          unmeasured warm-up rounds first (fresh guest memory is slow to touch on these VMs)
#   SIZE_MIB=1024     workload size (half pseudo-random pages, half repeated text)
#   QUIET_WAIT=120    before each dump+restore pair, wait up to this many seconds for 2 s with almost no
#                     CPU used by other processes (0 = do not wait)
#   BENCH_DIR=/var/tmp/cedana-driver-bench.PID   work folder (removed at the end unless KEEP=1)
#   CRIU=<path>       the CRIU binary (default: criu on PATH, else /usr/local/sbin/criu)
#   EXAMPLE=<path>    the criu_drivers binary (default: target/release/examples/criu_drivers, or under
#                     $CARGO_TARGET_DIR); NO_BUILD=1 skips `cargo build --release -p cedana --example criu_drivers`.
#                     It is copied into BENCH_DIR first, so a rebuild by someone else changes nothing.
# Other work on the machine (compilers, tests) is watched with scripts/bench/monitor.py; steps that overlapped
# more than 0.15 CPU-s (+2% of their time) of it are flagged in the table (not repeated).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)

ROUNDS=${ROUNDS:-5}
WARMUP=${WARMUP:-1}
SIZE_MIB=${SIZE_MIB:-1024}
QUIET_WAIT=${QUIET_WAIT:-120}
EXAMPLE=${EXAMPLE:-${CARGO_TARGET_DIR:-$ROOT/target}/release/examples/criu_drivers}

die() { echo "bench-criu-driver: $*" >&2; exit 1; }

# --- run under a child subreaper -------------------------------------------------------------------------
if [ -z "${CEDANA_DRIVER_BENCH_REAPER:-}" ]; then
    [ "$(id -u)" = 0 ] || die "run as root (CRIU needs it)"
    for tool in gcc python3; do
        command -v "$tool" >/dev/null || die "$tool is missing (apt-get install $tool)"
    done
    if [ "${NO_BUILD:-0}" != 1 ]; then
        echo "== cargo build --release -p cedana --example criu_drivers" >&2
        (cd "$ROOT" && cargo build --release -p cedana --example criu_drivers) >&2
    fi
    [ -x "$EXAMPLE" ] || die "no criu_drivers binary at $EXAMPLE"
    BENCH_DIR=${BENCH_DIR:-/var/tmp/cedana-driver-bench.$$}
    mkdir -p "$BENCH_DIR/bin"
    cp "$EXAMPLE" "$BENCH_DIR/bin/criu_drivers"
    gcc -O2 -Wall -o "$BENCH_DIR/bin/reaper" "$HERE/bench/reaper.c"
    gcc -O2 -Wall -o "$BENCH_DIR/bin/workload" "$HERE/bench/workload.c"
    export BENCH_DIR CEDANA_DRIVER_BENCH_REAPER=1 CEDANA_DRIVER_BENCH_SOURCE=$EXAMPLE
    exec "$BENCH_DIR/bin/reaper" bash "${BASH_SOURCE[0]}" "$@"
fi

if [ -z "${CRIU:-}" ]; then
    CRIU=$(command -v criu || true)
    [ -n "$CRIU" ] || CRIU=/usr/local/sbin/criu
fi
[ -x "$CRIU" ] || die "no CRIU at $CRIU (run scripts/setup.sh)"
export CEDANA_CRIU_BINARY_PATH=$CRIU
DRIVE=$BENCH_DIR/bin/criu_drivers
WORK=$BENCH_DIR
IMG=$WORK/images
RES=$WORK/results.tsv # round, driver, step, seconds, foreign CPU-s, CRIU's frozen time (dump)
MON=$WORK/monitor.log
: >"$RES"
WPID=
MONPID=

cleanup() {
    local rc=$?
    if [ -n "$WPID" ] && [ -e "/proc/$WPID" ] && [ "$(cat "/proc/$WPID/comm" 2>/dev/null)" = workload ]; then
        kill -KILL "$WPID" 2>/dev/null || true
        for ((i = 0; i < 200; i++)); do [ -e "/proc/$WPID" ] || break; sleep 0.01; done
    fi
    if [ -n "$MONPID" ]; then kill "$MONPID" 2>/dev/null || true; fi
    if [ "${KEEP:-0}" = 1 ]; then echo "kept $WORK" >&2; else rm -rf "$WORK"; fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

now() { date +%s.%N; }

# Wait until the dumped workload's PID is gone (not even a zombie), as CRIU restores it under that PID.
wait_gone() {
    local i
    for ((i = 0; i < 1000; i++)); do
        [ -e "/proc/$WPID" ] || return 0
        sleep 0.01
    done
    die "PID $WPID still exists 10 s after the dump"
}

check_alive() {
    [ "$(cat "/proc/$WPID/comm" 2>/dev/null)" = workload ] || die "$1: PID $WPID is not a running workload"
    case "$(awk '{print $3}' "/proc/$WPID/stat")" in
        S | R) ;;
        *) die "$1: PID $WPID is in state $(awk '{print $3}' "/proc/$WPID/stat")" ;;
    esac
}

# step ROUND DRIVER STEP ARGS...: run the example, record its elapsed time and the foreign CPU meanwhile.
step() {
    local round=$1 driver=$2 name=$3; shift 3
    local t0 t1 secs foreign frozen=""
    t0=$(now)
    if ! "$DRIVE" "$@" >"$WORK/last.out" 2>"$WORK/last.err"; then
        echo "bench-criu-driver: FAILED in round $round, $driver $name: criu_drivers $*" >&2
        cat "$WORK/last.out" "$WORK/last.err" >&2
        exit 1
    fi
    t1=$(now)
    secs=$(sed -n 's/^elapsed //p' "$WORK/last.out")
    [ -n "$secs" ] || die "criu_drivers printed no elapsed time: $(cat "$WORK/last.out")"
    sleep 0.25 # let the monitor write the sample that covers the end of the step
    foreign=$(awk -v a="$t0" -v b="$t1" '$1 > a && $1 <= b + 0.25 { f += $2 } END { printf "%.2f", f }' "$MON")
    if [ "$name" = dump ]; then
        frozen=$(python3 "$HERE/bench/summarize.py" --stats "$IMG.work/stats-dump" | awk '$1 == "frozen" { print $2 }')
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$driver" "$name" "$secs" "$foreign" "$frozen" >>"$RES"
    printf '  r%s %-4s %-7s %7.3f s  (foreign CPU %s s%s)\n' "$round" "$driver" "$name" "$secs" "$foreign" \
        "${frozen:+, CRIU frozen $frozen s}" >&2
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

pair() { # ROUND DRIVER
    wait_quiet
    rm -rf "$IMG" "$IMG.work"
    step "$1" "$2" dump dump --driver "$2" --pid "$WPID" --dir "$IMG"
    wait_gone
    step "$1" "$2" restore restore --driver "$2" --dir "$IMG"
    check_alive "$2 restore (round $1)"
    rm -rf "$IMG" "$IMG.work"
}

python3 "$HERE/bench/monitor.py" "$PPID" "$MON" 0.2 &
MONPID=$!

rev=$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo '?')
{
    echo "# $(date -u +%FT%TZ)  $(uname -r)  $(nproc) cores  criu $("$CRIU" --version | sed -n 's/^Version: //p')"
    echo "# criu_drivers: $CEDANA_DRIVER_BENCH_SOURCE built $(date -u -r "$CEDANA_DRIVER_BENCH_SOURCE" +%FT%TZ), git $rev"
    echo "# rounds=$ROUNDS warmup=$WARMUP size=${SIZE_MIB}MiB quiet-wait=${QUIET_WAIT}s dir=$WORK"
    echo "# load at start: $(cat /proc/loadavg)"
} | tee "$WORK/header.txt" >&2

setsid "$WORK/bin/workload" "$SIZE_MIB" "$WORK/workload.pid" "$WORK/workload.sum" </dev/null >/dev/null 2>&1 &
disown
for ((i = 0; i < 6000; i++)); do [ -s "$WORK/workload.pid" ] && break; sleep 0.01; done
WPID=$(cat "$WORK/workload.pid" 2>/dev/null) || die "the workload did not start"
check_alive "workload start"
echo "# workload PID $WPID, RSS $(awk '/VmRSS/{print $2, $3}' "/proc/$WPID/status")" | tee -a "$WORK/header.txt" >&2

total=$((WARMUP + ROUNDS))
for ((n = 0; n < total; n++)); do
    if ((n < WARMUP)); then r=0; else r=$((n - WARMUP + 1)); fi
    echo "== round $r$( ((r == 0)) && echo ' (warm-up)'), load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
    if ((n % 2 == 0)); then order="cli swrk"; else order="swrk cli"; fi
    for d in $order; do pair "$r" "$d"; done
done

# The restored workload must still hold exactly the bytes it wrote at start.
rm -f "$WORK/workload.sum"
kill -USR1 "$WPID"
for ((i = 0; i < 3000; i++)); do [ -s "$WORK/workload.sum" ] && break; sleep 0.01; done
read -r want got <"$WORK/workload.sum" || die "the workload wrote no checksum"
[ "$want" = "$got" ] || die "the restored workload's memory changed: checksum $got, expected $want"
{
    echo "# workload memory intact after $((2 * total)) restores (checksum $got)"
    echo "# load at end: $(cat /proc/loadavg)"
} | tee -a "$WORK/header.txt" >&2

cat "$WORK/header.txt"
python3 - "$RES" <<'EOF'
import statistics
import sys

rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
measured = [r for r in rows if r[0] != "0"]
warm = [r for r in rows if r[0] == "0"]


def vals(rs, driver, step, col=3):
    return [float(r[col]) for r in rs if r[1] == driver and r[2] == step and r[col] != ""]


def disturbed(rs, driver, step):
    return sum(1 for r in rs if r[1] == driver and r[2] == step and float(r[4]) > 0.15 + 0.02 * float(r[3]))


print(f"\n{'step':8} {'driver':6} {'median':>8} {'min':>8} {'max':>8}  {'n':>2}  {'CRIU frozen (median)':>20}  disturbed  warm-up")
for step in ("dump", "restore"):
    for d in ("cli", "swrk"):
        xs = vals(measured, d, step)
        if not xs:
            continue
        fz = vals(measured, d, step, 5)
        frozen = f"{statistics.median(fz):.3f} s" if fz else "-"
        w = ", ".join(f"{x:.3f}" for x in vals(warm, d, step)) or "-"
        print(f"{step:8} {d:6} {statistics.median(xs):8.3f} {min(xs):8.3f} {max(xs):8.3f}  {len(xs):2}  {frozen:>20}"
              f"  {disturbed(measured, d, step):9}  {w}")
print()
for step in ("dump", "restore"):
    c, s = vals(measured, "cli", step), vals(measured, "swrk", step)
    if not c or not s:
        continue
    by_round = {}
    for r in measured:
        if r[2] == step:
            by_round.setdefault(r[0], {})[r[1]] = float(r[3])
    paired = [v["swrk"] / v["cli"] for v in by_round.values() if "swrk" in v and "cli" in v and v["cli"] > 0]
    print(f"{step:8} swrk/cli: {statistics.median(s) / statistics.median(c):.3f} (ratio of medians), "
          f"{statistics.median(paired):.3f} (median of per-round ratios, range {min(paired):.3f}-{max(paired):.3f}), "
          f"difference of medians {statistics.median(s) - statistics.median(c):+.3f} s")
EOF
