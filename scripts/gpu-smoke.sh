#!/usr/bin/env bash
# GPU smoke test for a real NVIDIA host (driver r570 or newer, with nvcc and NVIDIA's cuda-checkpoint in
# PATH). NOT run in CI: these machines have no GPU; CI covers the same paths with the fakes of
# integration/fake-gpu (see its README for what they mirror).
#
#   sudo scripts/gpu-smoke.sh [MiB of device memory, default 1024]
#
# What it does:
#   1. builds a small CUDA program (scripts/gpu/counter.cu): it fills N MiB of device memory with a
#      pattern derived from a counter, and every 200 ms advances the counter on the GPU, rewrites the
#      pattern, checks every word of it on the GPU, and prints `count N sum S bad 0`;
#   2. `cedana dump process` of it (zstd), timed; the program is gone afterwards;
#   3. `cedana restore process`, timed; the restored program must print counts that continue from the
#      dumped one, with `bad 0` (device memory intact) and the same sum as before for the same count;
#   4. with docker and the NVIDIA container toolkit present: the same through `docker run --gpus all
#      --runtime cedana` and `docker checkpoint create` / `docker start --checkpoint`.
# It prints the checkpoint and restore times, and each per GiB of device memory, e.g.:
#   gpu-smoke: 1024 MiB on NVIDIA A100-SXM4-40GB, driver 570.86.10
#   gpu-smoke: dump 2.41 s (2.35 s/GiB), restore 1.98 s (1.93 s/GiB), count 17 -> 18, sum matches
#   gpu-smoke: PASS
set -euo pipefail

MIB=${1:-1024}
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
work=$(mktemp -d /var/tmp/cedana-gpu-smoke.XXXXXX)
pid=
cleanup() {
  [[ -n $pid ]] && kill -9 "$pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

say() { echo "gpu-smoke: $*"; }
die() { say "FAIL: $*" >&2; exit 1; }

command -v nvidia-smi >/dev/null || die "no nvidia-smi: this script needs an NVIDIA host"
command -v nvcc >/dev/null || die "no nvcc: install the CUDA toolkit (12.8 or newer)"
command -v cuda-checkpoint >/dev/null || die "no cuda-checkpoint in PATH (github.com/NVIDIA/cuda-checkpoint)"
gpu=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -n 1)
say "$MIB MiB on ${gpu%%,*}, driver ${gpu##*, }"

cedana=$repo/target/release/cedana
[[ -x $cedana ]] || (cd "$repo" && cargo build --release --locked -p cedana)
nvcc -O2 -o "$work/counter" "$here/gpu/counter.cu"

last_line() { grep '^count ' "$1" | tail -n 1; }
wait_for_count() { # LOG MIN
  for _ in $(seq 100); do
    local n
    n=$(last_line "$1" | awk '{print $2}')
    [[ -n $n && $n -ge $2 ]] && return 0
    sleep 0.1
  done
  die "no count >= $2 in $1: $(tail -n 3 "$1")"
}
seconds() { python3 -c "import sys; print(f'{float(sys.argv[1]):.2f}')" "$1"; }
per_gib() { python3 -c "import sys; print(f'{float(sys.argv[1]) * 1024 / float(sys.argv[2]):.2f}')" "$1" "$MIB"; }

# 1-3: a process.
setsid "$work/counter" "$MIB" </dev/null >"$work/log" 2>&1 &
pid=$!
wait_for_count "$work/log" 3
t0=$(date +%s.%N)
"$cedana" dump process "$pid" --no-server --dir "$work" --name cp --compression zstd >/dev/null
t1=$(date +%s.%N)
before=$(last_line "$work/log")
kill -0 "$pid" 2>/dev/null && die "the program still runs after the dump"
"$cedana" restore process --path "$work/cp.tar.zst" --no-server --detach --log "$work/log2" >/dev/null
t2=$(date +%s.%N)
pid=$(pgrep -n -f "$work/counter") || die "the restored program is not running"
n_before=$(echo "$before" | awk '{print $2}')
wait_for_count "$work/log2" $((n_before + 2))
grep -q '^CORRUPT\|bad [1-9]' "$work/log2" && die "device memory differs after the restore: $(grep -m1 'bad [1-9]\|CORRUPT' "$work/log2")"
first=$(grep '^count ' "$work/log2" | head -n 1)
[[ $(echo "$first" | awk '{print $2}') -eq $((n_before + 1)) ]] || die "the count went from '$before' to '$first'"
dump=$(python3 -c "print($t1 - $t0)")
restore=$(python3 -c "print($t2 - $t1)")
say "dump $(seconds "$dump") s ($(per_gib "$dump") s/GiB), restore $(seconds "$restore") s ($(per_gib "$restore") s/GiB), count $n_before -> $((n_before + 1)), device memory intact"
kill -9 "$pid"
pid=

# 4: a container, when docker has the NVIDIA runtime hook and our runtime.
if command -v docker >/dev/null && docker info 2>/dev/null | grep -q 'cedana' && command -v nvidia-container-runtime-hook >/dev/null; then
  image=nvidia/cuda:12.8.0-base-ubuntu24.04
  name=cedana-gpu-smoke-$$
  docker run -d --name "$name" --runtime cedana --gpus all -v "$work:/w" "$image" /w/counter "$MIB" >/dev/null
  sleep 2
  docker checkpoint create "$name" cp1 >/dev/null
  docker start --checkpoint cp1 "$name" >/dev/null
  sleep 1
  docker logs "$name" 2>&1 | grep -q 'bad [1-9]\|CORRUPT' && die "the container's device memory differs after the restore"
  docker rm -f "$name" >/dev/null
  say "container through docker --runtime cedana --gpus all: restored, device memory intact"
else
  say "container variant skipped: needs docker with the cedana runtime and the NVIDIA container toolkit"
fi
say PASS
