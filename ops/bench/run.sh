#!/usr/bin/env bash
# Builds the release binaries and runs the spine benchmarks (rpc, push, lock),
# printing their figures. Pass benchmark names to run only some.
set -euo pipefail
cd "$(dirname "$0")/../.."
ops/install-deps.sh
# The runner benchmark compares with supervisord (Debian's package).
if ! command -v supervisord >/dev/null; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends supervisor \
    || { $SUDO apt-get update -q && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends supervisor; }
  # The package starts its own system-wide supervisord; the benchmark runs its own.
  $SUDO service supervisor stop >/dev/null 2>&1 || true
fi
cargo build --release --workspace --bins
exec target/release/paddock-bench "$@"
