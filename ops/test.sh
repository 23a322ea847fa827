#!/usr/bin/env bash
# The test command: builds every binary (integration tests start them as processes),
# then runs every test with nextest's CI profile (plain `cargo test` without nextest).
set -euo pipefail
cd "$(dirname "$0")/.."
ops/install-deps.sh
cargo build --workspace --bins
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --profile ci "$@"
else
  cargo test --workspace "$@"
fi
