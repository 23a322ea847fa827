#!/usr/bin/env bash
# The test command: builds every binary (integration tests start them as processes),
# then runs every test with nextest's CI profile (plain `cargo test` without nextest).
# Debug builds only: CI builds nothing in release and runs no benchmarks (those are
# ops/bench/run.sh, run by hand; see docs/BENCHMARKS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
ops/install-deps.sh
cargo build --workspace --bins
# The run's shared test PostgreSQL lives under here. Its keeper stops it and removes
# its directory as soon as nextest exits; the check below makes a keeper that did
# not a failure, and stops it, so no postgres outlives the run.
PADDOCK_TEST_PG_DIR="$(mktemp -d "${TMPDIR:-/tmp}/paddock-test-pg.XXXXXX")"
export PADDOCK_TEST_PG_DIR
leftover_check() {
  local rc=$?
  for _ in $(seq 100); do
    [ -z "$(ls -A "$PADDOCK_TEST_PG_DIR")" ] && break
    sleep 0.2
  done
  if ! "${CARGO_TARGET_DIR:-target}/debug/paddock-test-pg" --stop-all "$PADDOCK_TEST_PG_DIR"; then
    rc=1
  fi
  rmdir "$PADDOCK_TEST_PG_DIR" 2>/dev/null || echo "ops/test.sh: $PADDOCK_TEST_PG_DIR is not empty" >&2
  exit "$rc"
}
trap leftover_check EXIT
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --profile ci "$@"
else
  cargo test --workspace "$@"
fi
