#!/usr/bin/env bash
# Object-store throughput: a 1 GiB archive uploaded through cedana's ObjectSink to a local moto server and
# read back through ObjectSource, against the same bytes written to and read from a local file (LocalFile,
# LocalSource). Rounds alternate local and object store. Needs moto (scripts/setup.sh installs it).
#
# Environment (all optional):
#   BENCH_SIZE_MIB   archive size (default 1024)
#   BENCH_ROUNDS     rounds (default 3)
#   BENCH_PART_MIB   upload part size (default 8)
#   BENCH_IN_FLIGHT  parts uploading at once (default 4)
#   BENCH_SEGMENT_MIB bytes one GET of a stream serves (default 64; moto reads a whole object for every
#                    ranged GET, so smaller segments cost it more than they would cost S3)
#   BENCH_DIR        folder of the local file (default /var/tmp)
# Extra arguments go to cargo (e.g. --target-dir DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
# Only the library's storage feature: the CLI's dependencies (gRPC, SQLite) are not needed here.
exec cargo run --release --locked -p cedana --no-default-features --features storage --example storage-bench "$@"
