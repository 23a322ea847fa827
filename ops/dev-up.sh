#!/usr/bin/env bash
# Brings up a local Paddock cluster in DIR (default ./.paddock-dev) and returns once
# every daemon answers: PostgreSQL (initdb'd there), heartbeat, locker, … supervised.
# Stop it with: target/debug/paddock dev down --dir DIR
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-.paddock-dev}"
ops/install-deps.sh
cargo build --workspace --bins
exec target/debug/paddock dev up --dir "$dir" --detach
