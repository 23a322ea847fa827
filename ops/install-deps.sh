#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks to build and test Paddock. Idempotent:
# does nothing when every package is already there.
#   ops/install-deps.sh          what the build, the tests and `paddock dev` need
#   ops/install-deps.sh --bench  that, and the benchmarks' competitors and tools
#                                (supervisor, haproxy, nginx, wrk, openssl, curl)
set -euo pipefail
packages=(postgresql libzmq3-dev pkg-config git openssh-client openssh-server procps python3 python3-zmq python3-venv python3-pip bsdutils iproute2 zstd tar)
bench=0
if [ "${1:-}" = "--bench" ]; then
  bench=1
  packages+=(supervisor haproxy wrk openssl curl)
fi
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# The node buildpack needs node and npm. Some images carry a nodejs that already
# provides npm (and conflicts with Debian's npm package): install only what is absent.
if ! command -v node >/dev/null; then missing+=(nodejs); fi
if ! command -v npm >/dev/null; then missing+=(npm); fi
# Any Debian nginx flavour serves the balancer benchmark; nginx-light is the smallest.
if [ $bench = 1 ] && ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then
  missing+=(nginx-light)
fi
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
echo "installing: ${missing[*]}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
# Debian starts a system-wide PostgreSQL cluster on install; Paddock makes its own.
if command -v pg_lsclusters >/dev/null && pg_lsclusters -h 2>/dev/null | grep -q online; then
  $SUDO pg_ctlcluster --force "$(pg_lsclusters -h | awk 'NR==1{print $1}')" main stop || true
fi
# Debian starts the system sshd on install; Paddock's gitserver runs its own.
if [[ " ${missing[*]} " == *" openssh-server"* ]]; then
  $SUDO service ssh stop >/dev/null 2>&1 || true
fi
# Likewise the benchmarks' competitors: the benchmarks run their own instances.
for s in supervisor haproxy nginx; do
  if [[ " ${missing[*]} " == *" $s"* ]]; then
    $SUDO service "$s" stop >/dev/null 2>&1 || true
  fi
done
