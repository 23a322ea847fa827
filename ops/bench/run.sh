#!/usr/bin/env bash
# Builds the release binaries and runs the spine benchmarks (rpc, push, lock),
# printing their figures. Pass benchmark names to run only some.
set -euo pipefail
cd "$(dirname "$0")/../.."
# The runner benchmark compares with supervisord (Debian's package).
ops/install-deps.sh --bench
cargo build --release --workspace --bins
exec target/release/paddock-bench "$@"
