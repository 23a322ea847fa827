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
# The apps' accounts (pdk-APP) the tests' runners and deployers make are system
# accounts, of which there are ~900: those this run made, and that no process
# uses any more, are removed at the end (accounts that were there before, a dev
# cluster's say, are left alone).
accounts_before="$(getent passwd | awk -F: '$1 ~ /^pdk-/ {print $1}' | sort)"
remove_test_accounts() {
  [ "$(id -u)" -eq 0 ] || return 0
  local now
  now="$(getent passwd | awk -F: '$1 ~ /^pdk-/ {print $1}' | sort)"
  for u in $(comm -13 <(printf '%s\n' "$accounts_before") <(printf '%s\n' "$now")); do
    pgrep -u "$u" >/dev/null 2>&1 || userdel "$u" 2>/dev/null || true
  done
}
leftover_check() {
  local rc=$?
  remove_test_accounts
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
