#!/usr/bin/env bash
# Migration of a container holding SIZE_MIB of memory between two nodes (network namespaces with their own
# containerd) through an S3-compatible server (moto), against a cold start of the same container on the
# target node; and the added time of checkpoint-on-stop to stopping it and to deleting its pod through the
# CRI. See integration/examples/bench_migration.rs for what is timed.
#
#   scripts/bench-migration.sh        # as root; SIZE_MIB=1024 ROUNDS=3 by default
#   S3_SERVER=s3s scripts/bench-migration.sh   # dumps into s3s-fs, restores read through nginx serving its
#                                              # files (lib/s3s.sh installs both once): moto and s3s-fs read the
#                                              # whole object from its start for every ranged read
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
[ "$(id -u)" = 0 ] || { echo "bench-migration: run as root" >&2; exit 1; }
cd "$ROOT"
if [ "${S3_SERVER:-moto}" = s3s ]; then
    # shellcheck source=lib/s3s.sh
    source scripts/lib/s3s.sh
    ensure_s3s_fs
    ensure_nginx
    export CEDANA_S3S_BIN=$S3S_BIN CEDANA_NGINX=$NGINX_PREFIX/usr/sbin/nginx
fi
# The shim, cedana-runc and cedana the example drives, and the example itself (release builds).
cargo build --release -p cedana -p cedana-runc -p containerd-shim-cedana-v2 >&2
cargo build --release -p cedana-integration --example bench_migration >&2
exec "${CARGO_TARGET_DIR:-$ROOT/target}/release/examples/bench_migration"
