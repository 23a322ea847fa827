#!/usr/bin/env bash
# Issue 10's benchmarks on a dev cluster of release binaries with 3 runners:
#  1. push → first 200 from the new release through the balancer (stdlib app,
#     warm build cache), p50 over N pushes;
#  2. a rolling deploy of a web=4 app under 64 concurrent clients through the
#     balancer: its duration and the requests that failed;
# (node loss is measured in network namespaces: ops/bench/deploy/node-loss.sh).
#   ops/bench/deploy/run.sh [N]      (N ≥ 5, default 5)
set -euo pipefail
cd "$(dirname "$0")/../../.."
N="${1:-5}"
ops/install-deps.sh
cargo build --release --workspace --bins
export PATH="$PWD/target/release:$PATH"
WORK="$(mktemp -d /tmp/paddock-bench-deploy.XXXXXX)"
chmod 0755 "$WORK"
cleanup() {
  PADDOCK_CONFIG="$WORK/dev/paddock.toml" paddock dev down --dir "$WORK/dev" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT
paddock dev up --dir "$WORK/dev" --detach --runners 3 >"$WORK/dev-up.txt"
python3 ops/bench/deploy/bench.py "$WORK" "$N"
