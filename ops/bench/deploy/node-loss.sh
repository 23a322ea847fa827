#!/usr/bin/env bash
# Node loss, measured for real: three runner nodes in network namespaces, the
# control daemons in another (integration/src/netns.rs); web=3, one per node,
# under a request loop through the balancer; node 2's link is taken down. The
# test `a_node_cut_off_serves_elsewhere_and_when_back_runs_nothing_twice` prints
# how long the heartbeat took to declare it dead and how long after that its
# instance served elsewhere (3 up on the other nodes and node 2 out of the
# leader's route table). Release binaries; N runs (default 5); p50 printed.
#   ops/bench/deploy/node-loss.sh [N]
set -euo pipefail
cd "$(dirname "$0")/../../.."
N="${1:-5}"
ops/install-deps.sh
cargo build --release --workspace --bins
dead=(); served=()
for i in $(seq 1 "$N"); do
  line="$(cargo nextest run --release -p paddock-integration --profile ci --test node_loss \
            a_node_cut_off_serves_elsewhere --no-capture 2>&1 | grep 'node-2 cut:' || true)"
  if [ -z "$line" ]; then echo "run $i: the test failed"; exit 1; fi
  echo "run $i: ${line#*node-2 cut: }"
  d="$(sed -E 's/.*declared dead after ([0-9.]+) s.*/\1/' <<<"$line")"
  s="$(sed -E 's/.*serving elsewhere ([0-9.]+) s after.*/\1/' <<<"$line")"
  dead+=("$d"); served+=("$s")
done
p50() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
echo
echo "node cut off, p50 of $N: declared dead after $(p50 "${dead[@]}") s (beats every 200 ms, dead after 3 missed);"
echo "  serving elsewhere $(p50 "${served[@]}") s after that (goal: < 5 s)"
