#!/usr/bin/env bash
# The main job end to end: start a workload, checkpoint it into a compressed file, kill it (the dump does),
# restore it, and show it continuing where it was; then the same through the daemon, as managed job (the
# seed's quick start: run, ps, dump job, ps, restore job). Needs root. Uses a scratch folder (and a daemon on
# a private socket in it) that it removes at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

[[ $(id -u) -eq 0 ]] || { echo "scripts/demo.sh needs root (CRIU does): sudo $0" >&2; exit 1; }
bash scripts/setup.sh >/dev/null
cargo build --release -p cedana --locked -q
CEDANA=$PWD/target/release/cedana

DEMO=$(mktemp -d /tmp/cedana-demo.XXXXXX)
WORKLOAD_PID=
DAEMON_PID=
JOB_PID=
cleanup() {
  [[ -n $WORKLOAD_PID ]] && kill -KILL "$WORKLOAD_PID" 2>/dev/null || true
  [[ -n $JOB_PID ]] && kill -KILL "$JOB_PID" 2>/dev/null || true
  [[ -n $DAEMON_PID ]] && kill -TERM "$DAEMON_PID" 2>/dev/null && wait "$DAEMON_PID" 2>/dev/null || true
  rm -rf "$DEMO"
}
trap cleanup EXIT

say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

say "Starting a workload: a counter that prints one number every 0.2 s to $DEMO/counter.log"
setsid sh -c 'i=0; while true; do i=$((i+1)); echo "count $i"; sleep 0.2; done' \
  </dev/null >"$DEMO/counter.log" 2>&1 &
WORKLOAD_PID=$!
sleep 2
echo "PID $WORKLOAD_PID, last lines:"; tail -n 3 "$DEMO/counter.log"

say "Checkpointing it: cedana dump process $WORKLOAD_PID --dir $DEMO --name demo --compression zstd"
"$CEDANA" dump process "$WORKLOAD_PID" --dir "$DEMO" --name demo --compression zstd
wait "$WORKLOAD_PID" 2>/dev/null || true
if kill -0 "$WORKLOAD_PID" 2>/dev/null; then echo "unexpected: the workload is still running"; exit 1; fi
LAST=$(tail -n 1 "$DEMO/counter.log")
echo "The workload is gone (the dump stopped it). Its last line: $LAST"
ls -l "$DEMO/demo.tar.zst"

say "The checkpoint's manifest: cedana checkpoint inspect $DEMO/demo.tar.zst"
"$CEDANA" checkpoint inspect "$DEMO/demo.tar.zst" | head -n 12

say "Restoring it: cedana restore process --path $DEMO/demo.tar.zst"
"$CEDANA" restore process --path "$DEMO/demo.tar.zst"
sleep 2
echo "Lines written since the restore:"
grep -A 8 -x "$LAST" "$DEMO/counter.log" | tail -n +1
NEXT=$(grep -A 1 -x "$LAST" "$DEMO/counter.log" | sed -n 2p)
if [[ "$NEXT" == "count $(( ${LAST#count } + 1 ))" ]]; then
  say "It continued where it was: '$LAST' was followed by '$NEXT'."
else
  echo "FAILED: after '$LAST' came '$NEXT'" >&2
  exit 1
fi
kill -KILL "$WORKLOAD_PID" 2>/dev/null || true

# --- the same through the daemon -------------------------------------------------------------------------
export CEDANA_ADDRESS=$DEMO/cedana.sock CEDANA_DB_PATH=$DEMO/jobs.db CEDANA_CHECKPOINT_DIR=$DEMO/checkpoints
say "Starting the daemon: cedana daemon start (socket $CEDANA_ADDRESS)"
"$CEDANA" daemon start >"$DEMO/daemon.log" 2>&1 &
DAEMON_PID=$!
for _ in $(seq 100); do [[ -S $CEDANA_ADDRESS ]] && break; sleep 0.1; done
"$CEDANA" daemon check

say "A managed job: cedana run process --jid demo-job -- sh -c '...counter...'"
"$CEDANA" run process --jid demo-job --out "$DEMO/job.log" -- \
  sh -c 'i=0; while true; do i=$((i+1)); echo "job count $i"; sleep 0.2; done'
sleep 2
"$CEDANA" ps

say "cedana dump job demo-job"
"$CEDANA" dump job demo-job
"$CEDANA" ps
LAST=$(tail -n 1 "$DEMO/job.log")
echo "Its last line: $LAST"

say "cedana restore job demo-job"
"$CEDANA" restore job demo-job
JOB_PID=$("$CEDANA" ps | awk '$1 == "demo-job" { print $3 }')
sleep 2
"$CEDANA" ps
"$CEDANA" job checkpoints demo-job
NEXT=$(grep -A 1 -x "$LAST" "$DEMO/job.log" | sed -n 2p)
if [[ "$NEXT" == "job count $(( ${LAST#job count } + 1 ))" ]]; then
  say "The job continued where it was: '$LAST' was followed by '$NEXT'."
else
  echo "FAILED: after '$LAST' came '$NEXT'" >&2
  exit 1
fi
"$CEDANA" job kill demo-job >/dev/null
