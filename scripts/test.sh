#!/usr/bin/env bash
# The whole test suite: installs what it needs (scripts/setup.sh, idempotent), builds the workspace, then
# runs every unit test and every integration test against the real CRIU, runc, containerd and dockerd.
# Needs root (CRIU, mounts, container engines). Extra arguments go to `cargo test` (e.g. a test name).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $(id -u) -ne 0 ]]; then
  echo "scripts/test.sh: the integration tests drive CRIU and container engines; run as root (sudo $0)" >&2
  exit 1
fi

bash scripts/setup.sh
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$HOME/.cargo/bin:$PATH

# The integration tests run the built binaries, so build them first.
cargo build --workspace --locked
cargo test --workspace --locked -- "$@"
