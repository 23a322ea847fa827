#!/usr/bin/env bash
# Brings up a local Paddock cluster in DIR (default ./.paddock-dev; more options are
# passed to `paddock dev up`, e.g. --runners 3) and returns once
# every daemon answers: PostgreSQL (initdb'd there), heartbeat, locker, … supervised.
# Stop it with: target/debug/paddock dev down --dir DIR
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-.paddock-dev}"
shift || true   # the rest: options of `paddock dev up` (--runners N, --blobstores 2)
ops/install-deps.sh
cargo build --workspace --bins
exec target/debug/paddock dev up --dir "$dir" --detach "$@"
