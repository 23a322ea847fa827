#!/usr/bin/env bash
# git push → release, measured as a user sees it: a dev cluster of release
# binaries, a user with an SSH key, two apps (a stdlib Python app and a Flask app
# with requirements.txt), N pushes each with a cold build cache and N warm. Prints
# the p50 of the whole push and of each step (from the deployer's build record).
#   ops/bench/push/run.sh [N]      (N ≥ 5, default 5)
set -euo pipefail
cd "$(dirname "$0")/../../.."
N="${1:-5}"
ops/install-deps.sh
cargo build --release --workspace --bins
export PATH="$PWD/target/release:$PATH"
WORK="$(mktemp -d /tmp/paddock-bench-push.XXXXXX)"
chmod 0755 "$WORK"
cleanup() {
  PADDOCK_CONFIG="$WORK/dev/paddock.toml" paddock dev down --dir "$WORK/dev" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT
paddock dev up --dir "$WORK/dev" --detach >"$WORK/dev-up.txt"
python3 ops/bench/push/bench.py "$WORK" "$N"
