#!/usr/bin/env bash
# Benchmark the daemon's own cost, side by side with the CLI alone and raw CRIU, in one run, alternating:
#   1. dump + restore of a small process (a counter): raw `criu dump`/`criu restore -d`, `cedana dump process`
#      / `cedana restore process` (no daemon), and `cedana dump job` / `cedana restore job` through the daemon;
#      the daemon's added cost per operation is job - process (median);
#   2. `cedana ps` with 1,000 jobs in the store (end to end, the CLI process included);
#   3. the idle daemon's resident memory.
#
#   scripts/bench-daemon.sh            # as root; builds cedana (release) first
#
# Environment: ROUNDS=10, JOBS=1000, NO_BUILD=1 (use target/release/cedana as it is), KEEP=1 (keep the folder).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
ROUNDS=${ROUNDS:-10}
JOBS=${JOBS:-1000}
[[ $(id -u) -eq 0 ]] || { echo "bench-daemon: run as root" >&2; exit 1; }
[[ ${NO_BUILD:-0} == 1 ]] || (cd "$ROOT" && cargo build --release -p cedana --locked -q)
CEDANA=$ROOT/target/release/cedana
CRIU=$(command -v criu || echo /usr/local/sbin/criu)
W=$(mktemp -d /var/tmp/cedana-bench-daemon.XXXXXX)
export CEDANA_ADDRESS=$W/cedana.sock CEDANA_DB_PATH=$W/jobs.db CEDANA_CHECKPOINT_DIR=$W/ckpt CEDANA_CHECKPOINT_COMPRESSION=none
DAEMON=
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  [[ -n $DAEMON ]] && kill -TERM "$DAEMON" 2>/dev/null && wait "$DAEMON" 2>/dev/null || true
  [[ ${KEEP:-0} == 1 ]] && echo "kept $W" >&2 || rm -rf "$W"
}
trap cleanup EXIT

"$CEDANA" daemon start >"$W/daemon.log" 2>&1 &
DAEMON=$!
for _ in $(seq 100); do [[ -S $CEDANA_ADDRESS ]] && break; sleep 0.1; done
gcc -O2 -o "$W/counter" "$ROOT/integration/workloads/counter.c"

now() { date +%s%N; }
ms() { echo "scale=1; ($2 - $1) / 1000000" | bc; }
gone() { for _ in $(seq 500); do [[ -e /proc/$1 ]] || return 0; sleep 0.01; done; }
RES=$W/results.tsv
: >"$RES"

# Three counters: one for raw CRIU, one for the CLI, one as a job of the daemon.
setsid "$W/counter" </dev/null >"$W/raw.log" 2>&1 & RAW=$!
setsid "$W/counter" </dev/null >"$W/cli.log" 2>&1 & CLI=$!
PIDS+=("$RAW" "$CLI")
read -r _ JOBPID < <("$CEDANA" run process --jid bench --out "$W/job.log" -- "$W/counter")
PIDS+=("$JOBPID")
sleep 0.5

raw() {
  rm -rf "$W/raw"; mkdir -p "$W/raw"
  local t0 t1 t2; t0=$(now)
  "$CRIU" dump -t "$RAW" -D "$W/raw" -o dump.log --shell-job
  t1=$(now); wait "$RAW" 2>/dev/null || true; gone "$RAW"; t1b=$(now)
  "$CRIU" restore -d -D "$W/raw" -o restore.log --shell-job
  t2=$(now)
  printf 'raw\tdump\t%s\nraw\trestore\t%s\n' "$(ms "$t0" "$t1")" "$(ms "$t1b" "$t2")" >>"$RES"
}
cli() {
  rm -rf "$W/cli-ckpt"
  local t0 t1 t1b t2; t0=$(now)
  "$CEDANA" dump process "$CLI" --dir "$W" --name cli-ckpt >/dev/null
  t1=$(now); wait "$CLI" 2>/dev/null || true; gone "$CLI"; t1b=$(now)
  "$CEDANA" restore process --path "$W/cli-ckpt" >/dev/null
  t2=$(now)
  printf 'cli\tdump\t%s\ncli\trestore\t%s\n' "$(ms "$t0" "$t1")" "$(ms "$t1b" "$t2")" >>"$RES"
}
job() {
  rm -rf "$W/ckpt"
  local t0 t1 t1b t2; t0=$(now)
  "$CEDANA" dump job bench >/dev/null
  t1=$(now); gone "$JOBPID"; t1b=$(now)
  "$CEDANA" restore job bench >/dev/null
  t2=$(now)
  printf 'job\tdump\t%s\njob\trestore\t%s\n' "$(ms "$t0" "$t1")" "$(ms "$t1b" "$t2")" >>"$RES"
}
for r in $(seq "$ROUNDS"); do
  case $((r % 3)) in
    0) raw; cli; job ;;
    1) cli; job; raw ;;
    2) job; raw; cli ;;
  esac
done

echo "## dump + restore of a small process ($ROUNDS rounds, alternating; ms)"
python3 - "$RES" <<'PY'
import sys, statistics as st
rows = [l.split('\t') for l in open(sys.argv[1]).read().split('\n') if l]
med = {}
print(f"{'side':6} {'op':8} {'median':>8} {'min':>8} {'max':>8}")
for side in ('raw', 'cli', 'job'):
    for op in ('dump', 'restore'):
        v = [float(r[2]) for r in rows if r[0] == side and r[1] == op]
        med[side, op] = st.median(v)
        print(f"{side:6} {op:8} {st.median(v):8.1f} {min(v):8.1f} {max(v):8.1f}")
for op in ('dump', 'restore'):
    print(f"daemon's added cost ({op}): job - cli = {med['job', op] - med['cli', op]:+.1f} ms; "
          f"job / raw = {med['job', op] / med['raw', op]:.2f}x, cli / raw = {med['cli', op] / med['raw', op]:.2f}x")
PY

echo "## cedana ps with $JOBS jobs"
for i in $(seq "$JOBS"); do "$CEDANA" run process --jid "j$i" --out /dev/null -- /bin/true >/dev/null; done
for i in $(seq 10); do t0=$(now); "$CEDANA" ps >/dev/null; t1=$(now); ms "$t0" "$t1"; done | sort -n | awk '{ v[NR] = $1 } END { printf "median %.1f ms, min %.1f, max %.1f over %d runs (%d jobs listed)\n", (v[5] + v[6]) / 2, v[1], v[NR], NR, '"$JOBS"' + 1 }'
sleep 2
echo "## idle daemon: $(grep VmRSS /proc/$DAEMON/status)"
