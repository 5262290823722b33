#!/usr/bin/env bash
# The main job end to end: start a workload, checkpoint it into a compressed file, kill it (the dump does),
# restore it, and show it continuing where it was (and once more, restored lazily); then the same through the daemon, as managed job (the
# seed's quick start: run, ps, dump job, ps, restore job); then a container run by containerd through our shim
# (io.containerd.cedana.v2), checkpointed with `cedana dump containerd` and restored as a new container.
# Needs root. Uses a scratch folder (and a daemon and a containerd on private sockets in it) that it removes
# at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/containerd.sh

[[ $(id -u) -eq 0 ]] || { echo "scripts/demo.sh needs root (CRIU does): sudo $0" >&2; exit 1; }
bash scripts/setup.sh >/dev/null
cargo build --release -p cedana -p cedana-runc -p containerd-shim-cedana-v2 --locked -q
CEDANA=$PWD/target/release/cedana
# containerd finds our shim (containerd-shim-cedana-v2), and the shim cedana-runc, on the PATH.
export PATH=$PWD/target/release:$PATH

DEMO=$(mktemp -d /tmp/cedana-demo.XXXXXX)
WORKLOAD_PID=
DAEMON_PID=
JOB_PID=
CONTAINERD_PID=
CTR=()
cleanup() {
  if [[ -n $CONTAINERD_PID ]]; then
    for id in demo-ctr demo-ctr-restored; do
      "${CTR[@]}" task kill -s SIGKILL "$id" >/dev/null 2>&1 || true
      for _ in $(seq 50); do
        "${CTR[@]}" task rm -f "$id" >/dev/null 2>&1 && break
        "${CTR[@]}" task ls -q 2>/dev/null | grep -qx "$id" || break
        sleep 0.1
      done
      "${CTR[@]}" container rm "$id" >/dev/null 2>&1 || true
    done
    kill -TERM "$CONTAINERD_PID" 2>/dev/null && wait "$CONTAINERD_PID" 2>/dev/null || true
    rmdir /run/containerd/runc/cedana-demo 2>/dev/null || true
    for d in /sys/fs/cgroup/*/cedana-demo; do [[ -d $d ]] && find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null; done || true
  fi
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

say "Once more, restored lazily (the program runs before its memory has arrived): an uncompressed checkpoint,"
echo "    cedana dump process $WORKLOAD_PID --dir $DEMO --name lazy --compression tar"
echo "    cedana restore process --path $DEMO/lazy.tar --lazy"
"$CEDANA" dump process "$WORKLOAD_PID" --dir "$DEMO" --name lazy --compression tar >/dev/null
LAST=$(tail -n 1 "$DEMO/counter.log")
# CRIU restores the process under its PID: wait until the old one is reaped.
while [[ -e /proc/$WORKLOAD_PID ]]; do sleep 0.05; done
"$CEDANA" restore process --path "$DEMO/lazy.tar" --lazy
sleep 1
NEXT=$(grep -A 1 -x "$LAST" "$DEMO/counter.log" | sed -n 2p)
if [[ "$NEXT" == "count $(( ${LAST#count } + 1 ))" ]]; then
  say "It continued again: '$LAST' was followed by '$NEXT'."
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

# --- a container through containerd and our shim ---------------------------------------------------------
say "A private containerd (root, state and socket under $DEMO/containerd)"
C=$DEMO/containerd
start_private_containerd "$C" || { echo "containerd did not start (see $C/containerd.log)" >&2; exit 1; }
CTR=(ctr -a "$C/containerd.sock" -n cedana-demo)
busybox_rootfs "$DEMO/rootfs"

say "ctr run --runtime io.containerd.cedana.v2 --rootfs ... demo-ctr: a counter writing to /count in its rootfs"
"${CTR[@]}" run --runtime io.containerd.cedana.v2 --detach --null-io --rootfs "$DEMO/rootfs" demo-ctr \
  /bin/sh -c 'i=0; while true; do i=$((i+1)); echo "container count $i" >> /count; sleep 0.2; done'
sleep 2
"${CTR[@]}" task ls
tail -n 2 "$DEMO/rootfs/count"

say "cedana dump containerd demo-ctr --address $C/containerd.sock --namespace cedana-demo --compression zstd"
"$CEDANA" dump containerd demo-ctr --address "$C/containerd.sock" --namespace cedana-demo \
  --dir "$DEMO/checkpoints" --name demo-ctr --compression zstd
sleep 0.5
"${CTR[@]}" task ls
LAST=$(tail -n 1 "$DEMO/rootfs/count")
echo "Its last line: $LAST"

say "cedana restore containerd --path $DEMO/checkpoints/demo-ctr.tar.zst --id demo-ctr-restored --detach"
"$CEDANA" restore containerd --path "$DEMO/checkpoints/demo-ctr.tar.zst" --id demo-ctr-restored \
  --address "$C/containerd.sock" --namespace cedana-demo --detach
sleep 2
"${CTR[@]}" task ls
NEXT=$(grep -A 1 -x "$LAST" "$DEMO/rootfs/count" | sed -n 2p)
if [[ "$NEXT" == "container count $(( ${LAST#container count } + 1 ))" ]]; then
  say "The container continued where it was: '$LAST' was followed by '$NEXT'."
else
  echo "FAILED: after '$LAST' came '$NEXT'" >&2
  exit 1
fi
