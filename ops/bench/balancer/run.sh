#!/usr/bin/env bash
# paddock-balancer against HAProxy, side by side in the same run, in front of the
# same backend (one nginx worker serving a small file). wrk drives each proxy in
# alternated rounds (paddock, haproxy, paddock, haproxy, ...) with the same thread
# and connection counts, in these modes (the first three by default):
#   keepalive  HTTP/1.1, keep-alive client connections
#   close      a new client connection per request (Connection: close)
#   https      TLS 1.3, keep-alive client connections (one handshake per connection)
#   https-close  (not run by default) a new TLS connection, full handshake, per request
# Both proxies keep pooled keep-alive connections to nginx, route by Host
# (bench.local; another host is a 404) and add X-Forwarded-*, X-Request-Id and Via.
#
# Prints per mode each round and the median of the rounds (req/s, p50, p99, wrk
# errors, CPU time of the proxy process per request) and the ratios paddock/haproxy,
# then the balancer's own error counters over the rounds. Everything listens on
# 127.0.0.1 and is stopped on exit, failure included.
#
# Environment (defaults in brackets):
#   THREADS [1] CONNS [50] DURATION [10s]   wrk -t -c -d, the same for both proxies
#   ROUNDS [3]                              measured rounds per proxy, keepalive mode
#   ROUNDS_CLOSE, ROUNDS_HTTPS [min(ROUNDS,2)]  rounds of the other modes
#   MODES ["keepalive close https"]         any of keepalive close https https-close
#   WARMUP [2s]                             one unmeasured wrk run per proxy and mode (0: none)
#   PROXY_THREADS [2]                       paddock threads = haproxy nbthread
#   BODY_BYTES [100]                        size of the file nginx serves
#   OUT                                     also write the figures as JSON to this path
#   SKIP_BUILD [0]                          1: use target/release/paddock-balancer as is
#   KEEP_TMP [0]                            1: keep the temp dir (configs, logs, wrk output)
# Default run: about 2.5 minutes after the build.
set -euo pipefail
cd "$(dirname "$0")/../../.."
HERE=ops/bench/balancer

THREADS=${THREADS:-1}
CONNS=${CONNS:-50}
DURATION=${DURATION:-10s}
ROUNDS=${ROUNDS:-3}
ROUNDS_CLOSE=${ROUNDS_CLOSE:-$((ROUNDS < 2 ? ROUNDS : 2))}
ROUNDS_HTTPS=${ROUNDS_HTTPS:-$((ROUNDS < 2 ? ROUNDS : 2))}
MODES=${MODES:-keepalive close https}
WARMUP=${WARMUP:-2s}
PROXY_THREADS=${PROXY_THREADS:-2}
BODY_BYTES=${BODY_BYTES:-100}
OUT=${OUT:-}
SKIP_BUILD=${SKIP_BUILD:-0}
KEEP_TMP=${KEEP_TMP:-0}
DOMAIN=bench.local

for m in $MODES; do
  case $m in keepalive | close | https | https-close) ;; *)
    echo "MODES: unknown mode '$m' (keepalive close https https-close)" >&2; exit 2 ;;
  esac
done

# ---- packages ---------------------------------------------------------------------
ops/install-deps.sh --bench
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
HAPROXY=$(command -v haproxy || echo /usr/sbin/haproxy)

# ---- build ------------------------------------------------------------------------
if [ "$SKIP_BUILD" != 1 ]; then
  cargo build --release -q -p paddock-balancer
fi
BALANCER=$PWD/target/release/paddock-balancer
[ -x "$BALANCER" ] || { echo "$BALANCER is missing (build it, or unset SKIP_BUILD)" >&2; exit 1; }

# ---- processes, cleanup -------------------------------------------------------------
TMP=$(mktemp -d /tmp/paddock-bench-balancer.XXXXXX)
# nginx's worker may run as nobody (when started by root): it must reach the file.
chmod 755 "$TMP"
PIDS=()
WRK_PID=""
stop_all() {
  [ -n "$WRK_PID" ] && kill -TERM "$WRK_PID" 2>/dev/null
  local pid alive i
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for i in $(seq 100); do
    alive=0
    for pid in "${PIDS[@]}" $WRK_PID; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && break
    sleep 0.1
  done
  for pid in "${PIDS[@]}" $WRK_PID; do
    if kill -0 "$pid" 2>/dev/null; then
      echo "pid $pid did not stop within 10 s of SIGTERM: SIGKILL" >&2
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
  wait 2>/dev/null || true
  PIDS=(); WRK_PID=""
}
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  stop_all
  if [ $rc -ne 0 ] || [ "$KEEP_TMP" = 1 ]; then
    echo "configs and logs kept in $TMP" >&2
    if [ $rc -ne 0 ]; then
      for f in "$TMP"/*.log; do
        [ -s "$f" ] && { echo "--- tail of $f" >&2; tail -n 15 "$f" >&2; }
      done
    fi
  else
    rm -rf "$TMP"
  fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

die() { echo "error: $*" >&2; exit 1; }

# A free port below the ephemeral range (so no outgoing connection takes it meanwhile).
USED_PORTS=" "
free_port() {
  local p
  for _ in $(seq 200); do
    p=$((20000 + RANDOM % 12000))
    [[ "$USED_PORTS" == *" $p "* ]] && continue
    [ -z "$(ss -Htan "( sport = :$p or dport = :$p )" 2>/dev/null)" ] || continue
    USED_PORTS+="$p "
    echo "$p"; return 0
  done
  die "no free port found"
}

# Waits until 127.0.0.1:$2 accepts, while pid $1 lives.
wait_port() {
  local pid=$1 port=$2 name=$3 i
  for i in $(seq 300); do
    kill -0 "$pid" 2>/dev/null || die "$name exited before listening on $port"
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
    sleep 0.1
  done
  die "$name did not listen on 127.0.0.1:$port within 30 s"
}

P_NGINX=$(free_port)
P_HB=$(free_port) P_RPC=$(free_port) P_PUB=$(free_port)
P_PD_HTTP=$(free_port) P_PD_HTTPS=$(free_port) P_PD_ADMIN=$(free_port)
P_HA_HTTP=$(free_port) P_HA_HTTPS=$(free_port)

# ---- backend: nginx ---------------------------------------------------------------
mkdir -p "$TMP/nginx/www" "$TMP/nginx/logs"
chmod 755 "$TMP/nginx" "$TMP/nginx/www"
head -c "$BODY_BYTES" /dev/zero | tr '\0' 'x' >"$TMP/nginx/www/index.html"
chmod 644 "$TMP/nginx/www/index.html"
cat >"$TMP/nginx/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $TMP/nginx/nginx.pid;
error_log $TMP/nginx.log warn;
events { worker_connections 8192; }
http {
  access_log off;
  keepalive_timeout 75s;
  keepalive_requests 10000000;
  client_body_temp_path $TMP/nginx/tmp-body;
  proxy_temp_path $TMP/nginx/tmp-proxy;
  fastcgi_temp_path $TMP/nginx/tmp-fastcgi;
  uwsgi_temp_path $TMP/nginx/tmp-uwsgi;
  scgi_temp_path $TMP/nginx/tmp-scgi;
  default_type text/html;
  server {
    listen 127.0.0.1:$P_NGINX;
    root $TMP/nginx/www;
  }
}
EOF
"$NGINX" -p "$TMP/nginx" -c "$TMP/nginx/nginx.conf" -e "$TMP/nginx.log" >>"$TMP/nginx.log" 2>&1 &
PIDS+=($!)
wait_port "$!" "$P_NGINX" nginx

# ---- TLS: one self-signed certificate for both proxies ---------------------------
mkdir -p "$TMP/tls"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
  -subj "/CN=$DOMAIN" -addext "subjectAltName=DNS:$DOMAIN" \
  -keyout "$TMP/tls/key.pem" -out "$TMP/tls/cert.pem" >"$TMP/openssl.log" 2>&1 \
  || die "openssl could not make a certificate (see $TMP/openssl.log)"
chmod 600 "$TMP/tls/key.pem"
cat "$TMP/tls/cert.pem" "$TMP/tls/key.pem" >"$TMP/tls/combined.pem"
chmod 600 "$TMP/tls/combined.pem"

# ---- paddock-balancer ---------------------------------------------------------------
# The route and certificate go straight into the routes file it loads at start
# (the same file its rpc kinds persist to), so no CLI and no rpc client is needed.
json_str() { # a file as a JSON string
  awk 'BEGIN { ORS = "" } { gsub(/\\/, "\\\\"); gsub(/"/, "\\\""); print $0 "\\n" }' "$1"
}
mkdir -p "$TMP/state/balancer"
chmod 700 "$TMP/state" "$TMP/state/balancer"
cat >"$TMP/state/balancer/routes.json" <<EOF
{"apps": {"bench": {"domains": ["$DOMAIN"], "owner": "operator",
                    "backends": [{"id": "n1", "addr": "127.0.0.1:$P_NGINX", "weight": 1}],
                    "health": {}}},
 "certs": [{"domains": ["$DOMAIN"], "cert_pem": "$(json_str "$TMP/tls/cert.pem")",
            "key_pem": "$(json_str "$TMP/tls/key.pem")"}],
 "token": 0}
EOF
chmod 600 "$TMP/state/balancer/routes.json"
( umask 077
  cat >"$TMP/paddock.toml" <<EOF
node = "bench"
signing_key = "k"
state_dir = "$TMP/state"

[keys]
k = "$(openssl rand -hex 32)"

[cluster]
heartbeats = ["tcp://127.0.0.1:$P_HB"]

[daemons.balancer]
rpc = "tcp://127.0.0.1:$P_RPC"
pub = "tcp://127.0.0.1:$P_PUB"
http = "tcp://127.0.0.1:$P_PD_HTTP"
https = "tcp://127.0.0.1:$P_PD_HTTPS"
admin = "tcp://127.0.0.1:$P_PD_ADMIN"
threads = $PROXY_THREADS
handoff_drain_ms = 2000
EOF
)
"$BALANCER" --config "$TMP/paddock.toml" >"$TMP/paddock.log" 2>&1 &
PIDS+=($!)
PD_PID=$!
wait_port "$PD_PID" "$P_PD_HTTP" paddock-balancer
wait_port "$PD_PID" "$P_PD_HTTPS" paddock-balancer

# ---- HAProxy ------------------------------------------------------------------------
# HAProxy refuses to start when maxconn needs more descriptors than it may open.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
HA_MAXCONN=$(( ($(ulimit -n) - 200) / 2 ))
[ "$HA_MAXCONN" -gt 10000 ] && HA_MAXCONN=10000
[ "$HA_MAXCONN" -gt $((CONNS * 2)) ] || die "the descriptor limit ($(ulimit -n)) is too low for CONNS=$CONNS"
cat >"$TMP/haproxy.cfg" <<EOF
global
  nbthread $PROXY_THREADS
  maxconn $HA_MAXCONN
  ssl-default-bind-options ssl-min-ver TLSv1.2

defaults
  mode http
  option http-keep-alive
  http-reuse always
  timeout connect 3s
  timeout client 30s
  timeout server 30s
  timeout http-request 10s
  timeout http-keep-alive 10s
  unique-id-format %{+X}o\ %ci:%cp_%fi:%fp_%Ts_%rt:%pid

frontend bench
  bind 127.0.0.1:$P_HA_HTTP
  bind 127.0.0.1:$P_HA_HTTPS ssl crt $TMP/tls/combined.pem alpn http/1.1
  http-request deny deny_status 404 unless { req.hdr(host),field(1,:) -i $DOMAIN }
  option forwardfor
  http-request set-header X-Forwarded-Proto https if { ssl_fc }
  http-request set-header X-Forwarded-Proto http unless { ssl_fc }
  http-request set-header X-Forwarded-Port %[dst_port]
  http-request set-header X-Forwarded-Host %[req.hdr(host)]
  http-request set-header X-Request-Id %[unique-id]
  http-request add-header Via "1.1 haproxy"
  default_backend nginx

backend nginx
  server n1 127.0.0.1:$P_NGINX check inter 2s
EOF
"$HAPROXY" -c -q -f "$TMP/haproxy.cfg" >"$TMP/haproxy.log" 2>&1 || die "haproxy refuses its config: $(cat "$TMP/haproxy.log")"
"$HAPROXY" -db -f "$TMP/haproxy.cfg" >>"$TMP/haproxy.log" 2>&1 &
PIDS+=($!)
HA_PID=$!
wait_port "$HA_PID" "$P_HA_HTTP" haproxy
wait_port "$HA_PID" "$P_HA_HTTPS" haproxy

# ---- sanity: both answer the route with nginx's file, and 404 another host ----------
check() { # name url [curl args...]
  local name=$1 url=$2; shift 2
  local got code
  got=$(curl -sS --max-time 5 -H "Host: $DOMAIN" "$@" "$url") || die "$name: curl $url failed"
  [ "$got" = "$(cat "$TMP/nginx/www/index.html")" ] || die "$name: $url answered something else than the backend's file: ${got:0:200}"
  code=$(curl -sS --max-time 5 -o /dev/null -w '%{http_code}' -H "Host: other.local" "$@" "$url") || die "$name: curl $url failed"
  [ "$code" = 404 ] || die "$name: $url with an unrouted Host answered $code, not 404"
}
check paddock "http://127.0.0.1:$P_PD_HTTP/"
check haproxy "http://127.0.0.1:$P_HA_HTTP/"
check paddock "https://$DOMAIN:$P_PD_HTTPS/" --cacert "$TMP/tls/cert.pem" --resolve "$DOMAIN:$P_PD_HTTPS:127.0.0.1"
check haproxy "https://$DOMAIN:$P_HA_HTTPS/" --cacert "$TMP/tls/cert.pem" --resolve "$DOMAIN:$P_HA_HTTPS:127.0.0.1"
# What TLS each negotiates with OpenSSL's defaults (the library wrk uses).
tls_of() {
  openssl s_client -connect "127.0.0.1:$1" -servername "$DOMAIN" -brief </dev/null 2>&1 \
    | awk -F': ' '/^Protocol version/ { v = $2 } /^Ciphersuite/ { c = $2 } /^Server Temp Key/ { k = $2 } END { print v " " c " " k }'
}
TLS_PD=$(tls_of "$P_PD_HTTPS")
TLS_HA=$(tls_of "$P_HA_HTTPS")

# The balancer's own counters now (the checks above made 404s, and the port probe a
# failed handshake) and after the rounds: what went wrong during the rounds is the
# difference.
curl -sS --max-time 5 "http://127.0.0.1:$P_PD_ADMIN/metrics" >"$TMP/paddock-metrics-before.txt" 2>/dev/null || true

# ---- rounds -------------------------------------------------------------------------
RESULTS=$TMP/results.txt # mode proxy round rps p50_us p99_us errors requests cpu_us_per_req cpu_pct
CLK_TCK=$(getconf CLK_TCK)
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; } # user + system, every thread
: >"$RESULTS"
url_for() { # proxy mode
  local port
  case "$1:$2" in
    paddock:https*) port=$P_PD_HTTPS ;; paddock:*) port=$P_PD_HTTP ;;
    haproxy:https*) port=$P_HA_HTTPS ;; haproxy:*) port=$P_HA_HTTP ;;
  esac
  case $2 in https*) echo "https://$DOMAIN:$port/" ;; *) echo "http://$DOMAIN:$port/" ;; esac
}
run_wrk() { # proxy mode duration log; sets LINE to wrk's RESULT line
  local proxy=$1 mode=$2 dur=$3 log=$4
  local hdr=()
  case $mode in *close) hdr=(-H "Connection: close") ;; esac
  WRK_CONNECT=127.0.0.1 wrk -t"$THREADS" -c"$CONNS" -d"$dur" --latency --timeout 5s \
    -s "$HERE/report.lua" -H "Host: $DOMAIN" "${hdr[@]}" "$(url_for "$proxy" "$mode")" >"$log" 2>&1 &
  WRK_PID=$!
  wait "$WRK_PID" || { WRK_PID=""; die "wrk failed against $proxy ($mode): $(tail -n 5 "$log")"; }
  WRK_PID=""
  LINE=$(grep '^RESULT ' "$log") || die "wrk printed no result against $proxy ($mode): $(tail -n 5 "$log")"
}
field() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<"$2"; }

echo "rounds, as they run (wrk output in $TMP while it runs):"
for mode in $MODES; do
  case $mode in
    keepalive) n=$ROUNDS ;; close) n=$ROUNDS_CLOSE ;; *) n=$ROUNDS_HTTPS ;;
  esac
  [ "$n" -ge 1 ] || continue
  for proxy in paddock haproxy; do
    kill -0 "$PD_PID" 2>/dev/null || die "paddock-balancer died"
    kill -0 "$HA_PID" 2>/dev/null || die "haproxy died"
    if [ "$WARMUP" != 0 ]; then run_wrk "$proxy" "$mode" "$WARMUP" "$TMP/wrk-$mode-$proxy-warmup.out"; fi
  done
  for r in $(seq "$n"); do
    for proxy in paddock haproxy; do
      kill -0 "$PD_PID" 2>/dev/null || die "paddock-balancer died (see $TMP/paddock.log)"
      kill -0 "$HA_PID" 2>/dev/null || die "haproxy died (see $TMP/haproxy.log)"
      if [ "$proxy" = paddock ]; then ppid=$PD_PID; else ppid=$HA_PID; fi
      t0=$(cpu_ticks "$ppid")
      run_wrk "$proxy" "$mode" "$DURATION" "$TMP/wrk-$mode-$proxy-$r.out"
      t1=$(cpu_ticks "$ppid")
      line=$LINE
      cpu=$(awk -v t=$((t1 - t0)) -v hz="$CLK_TCK" -v n="$(field requests "$line")" -v d="$(field duration_us "$line")" \
        'BEGIN { us = t * 1e6 / hz; printf "%.2f %.0f", (n > 0 ? us / n : 0), (d > 0 ? 100 * us / d : 0) }')
      errs=0
      for k in connect read write status timeout; do errs=$((errs + $(field "$k" "$line"))); done
      echo "$mode $proxy $r $(field rps "$line") $(field p50_us "$line") $(field p99_us "$line") $errs $(field requests "$line") $cpu" >>"$RESULTS"
      printf '  %-11s %-8s round %d: %10s req/s  p50 %6s us  p99 %6s us  errors %s  cpu %s us/req, %s %%\n' \
        "$mode" "$proxy" "$r" "$(field rps "$line")" "$(field p50_us "$line")" "$(field p99_us "$line")" "$errs" ${cpu}
    done
  done
done
kill -0 "$PD_PID" 2>/dev/null || die "paddock-balancer died at the end (see $TMP/paddock.log)"
curl -sS --max-time 5 "http://127.0.0.1:$P_PD_ADMIN/metrics" >"$TMP/paddock-metrics-after.txt" 2>/dev/null || true

# ---- report -------------------------------------------------------------------------
stop_all
echo
OUT=$OUT awk -v threads="$THREADS" -v conns="$CONNS" -v dur="$DURATION" -v pthreads="$PROXY_THREADS" \
  -v bytes="$BODY_BYTES" -v modes="$MODES" -v warm="$WARMUP" -v tls_pd="$TLS_PD" -v tls_ha="$TLS_HA" '
function median(arr, n,   i, j, t, s) { # sorts a copy
  for (i = 1; i <= n; i++) s[i] = arr[i]
  for (i = 2; i <= n; i++) { t = s[i]; for (j = i - 1; j >= 1 && s[j] > t; j--) s[j + 1] = s[j]; s[j + 1] = t }
  return (n % 2) ? s[(n + 1) / 2] : (s[n / 2] + s[n / 2 + 1]) / 2
}
function ms(us) { return sprintf("%.3f ms", us / 1000) }
function ratio(a, b) { return b > 0 ? sprintf("%.2fx", a / b) : "-" }
{
  k = $1 SUBSEP $2; n[k]++
  rps[k, n[k]] = $4; p50[k, n[k]] = $5; p99[k, n[k]] = $6; rerr[k, n[k]] = $7; err[k] += $7; reqs[k] += $8
  cpr[k, n[k]] = $9; cpc[k, n[k]] = $10
}
END {
  desc["keepalive"] = "keep-alive"; desc["close"] = "new connection per request"
  desc["https"] = "TLS 1.3, keep-alive"; desc["https-close"] = "TLS 1.3, new connection (full handshake) per request"
  printf "paddock-balancer vs HAProxy: wrk -t%s -c%s -d%s --latency, Host: bench.local, %s-byte file from one nginx worker\n", threads, conns, dur, bytes
  printf "proxies: %s threads each (paddock threads = haproxy nbthread), alternated rounds, %s warm-up per proxy and mode\n", pthreads, warm
  if (modes ~ /https/) printf "TLS (ECDSA P-256 certificate): paddock %s; haproxy %s\n", tls_pd, tls_ha
  nm = split(modes, M, " ")
  for (mi = 1; mi <= nm; mi++) {
    m = M[mi]; kp = m SUBSEP "paddock"; kh = m SUBSEP "haproxy"
    if (!(kp in n)) continue
    printf "\n%s (%s), %d round(s) each\n", m, desc[m], n[kp]
    printf "  %-8s %-7s %12s %12s %12s %8s %12s %8s\n", "proxy", "round", "req/s", "p50", "p99", "errors", "cpu us/req", "cpu %"
    for (r = 1; r <= n[kp]; r++) for (pi = 1; pi <= 2; pi++) {
      k = (pi == 1) ? kp : kh; name = (pi == 1) ? "paddock" : "haproxy"
      printf "  %-8s %-7d %12.0f %12s %12s %8d %12.2f %8.0f\n", name, r, rps[k, r], ms(p50[k, r]), ms(p99[k, r]), rerr[k, r], cpr[k, r], cpc[k, r]
    }
    for (pi = 1; pi <= 2; pi++) {
      k = (pi == 1) ? kp : kh; name = (pi == 1) ? "paddock" : "haproxy"
      for (r = 1; r <= n[k]; r++) { a[r] = rps[k, r]; b[r] = p50[k, r]; c[r] = p99[k, r]; e[r] = cpr[k, r]; f[r] = cpc[k, r] }
      MR[k] = median(a, n[k]); M50[k] = median(b, n[k]); M99[k] = median(c, n[k]); MC[k] = median(e, n[k]); MP[k] = median(f, n[k])
      printf "  %-8s %-7s %12.0f %12s %12s %8d %12.2f %8.0f\n", name, "median", MR[k], ms(M50[k]), ms(M99[k]), err[k], MC[k], MP[k]
    }
    printf "  %-16s %12s %12s %12s %8s %12s %8s\n", "paddock/haproxy", ratio(MR[kp], MR[kh]), ratio(M50[kp], M50[kh]), ratio(M99[kp], M99[kh]), "", ratio(MC[kp], MC[kh]), ratio(MP[kp], MP[kh])
  }
  printf "\nsummary (medians)\n"
  printf "  %-12s %12s %12s | %9s %9s %9s %9s | %10s %10s | %7s %7s %7s %7s\n", "mode", "paddock r/s", "haproxy r/s", "pd p50", "ha p50", "pd p99", "ha p99", "pd cpu/rq", "ha cpu/rq", "r/s", "p50", "p99", "cpu/rq"
  for (mi = 1; mi <= nm; mi++) {
    m = M[mi]; kp = m SUBSEP "paddock"; kh = m SUBSEP "haproxy"
    if (!(kp in n)) continue
    printf "  %-12s %12.0f %12.0f | %9s %9s %9s %9s | %10s %10s | %7s %7s %7s %7s\n", m, MR[kp], MR[kh],
      sprintf("%.2fms", M50[kp] / 1000), sprintf("%.2fms", M50[kh] / 1000), sprintf("%.2fms", M99[kp] / 1000), sprintf("%.2fms", M99[kh] / 1000),
      sprintf("%.1fus", MC[kp]), sprintf("%.1fus", MC[kh]),
      ratio(MR[kp], MR[kh]), ratio(M50[kp], M50[kh]), ratio(M99[kp], M99[kh]), ratio(MC[kp], MC[kh])
  }
  printf "  ratios are paddock/haproxy: req/s above 1, latency and cpu below 1 favour paddock. errors: wrk socket\n"
  printf "  errors + non-2xx/3xx. cpu: user+system time of the proxy process during its round (all its threads),\n"
  printf "  per request and as %% of one core; the machine is shared with wrk and nginx, so req/s is partly cpu share.\n"
  out = ENVIRON["OUT"]
  if (out != "") {
    printf "{\"wrk\": {\"threads\": %s, \"connections\": %s, \"duration\": \"%s\"}, \"proxy_threads\": %s, \"body_bytes\": %s, \"modes\": {", threads, conns, dur, pthreads, bytes > out
    first = 1
    for (mi = 1; mi <= nm; mi++) {
      m = M[mi]; kp = m SUBSEP "paddock"; kh = m SUBSEP "haproxy"
      if (!(kp in n)) continue
      printf "%s\"%s\": {", (first ? "" : ", "), m > out; first = 0
      for (pi = 1; pi <= 2; pi++) {
        k = (pi == 1) ? kp : kh; name = (pi == 1) ? "paddock" : "haproxy"
        printf "\"%s\": {\"median\": {\"rps\": %.1f, \"p50_us\": %d, \"p99_us\": %d, \"cpu_us_per_req\": %.2f, \"cpu_pct\": %.0f}, \"errors\": %d, \"requests\": %d, \"rounds\": [", name, MR[k], M50[k], M99[k], MC[k], MP[k], err[k], reqs[k] > out
        for (r = 1; r <= n[k]; r++) printf "%s{\"rps\": %.1f, \"p50_us\": %d, \"p99_us\": %d, \"errors\": %d, \"cpu_us_per_req\": %.2f, \"cpu_pct\": %.0f}", (r > 1 ? ", " : ""), rps[k, r], p50[k, r], p99[k, r], rerr[k, r], cpr[k, r], cpc[k, r] > out
        printf "]}, " > out
      }
      printf "\"ratio\": {\"rps\": %.3f, \"p50\": %.3f, \"p99\": %.3f, \"cpu_per_req\": %.3f}}", MR[kp] / MR[kh], M50[kp] / M50[kh], M99[kp] / M99[kh], (MC[kh] > 0 ? MC[kp] / MC[kh] : 0) > out
    }
    printf "}}\n" > out
  }
}' "$RESULTS"
[ -n "$OUT" ] && echo "figures written to $OUT"

# What went wrong during the rounds by the balancer's own count: 0 expected.
if [ -s "$TMP/paddock-metrics-after.txt" ]; then
  bad=$(awk '/^#/ { next }
    FNR == NR { before[$1] = $2; next }
    $1 ~ /(error|failure|retries|unknown_host|bad_request|dropped|timeout|eject|class="[45]xx")/ && $2 - before[$1] != 0 { print "  " $1 " +" $2 - before[$1] }' \
    "$TMP/paddock-metrics-before.txt" "$TMP/paddock-metrics-after.txt")
  if [ -n "$bad" ]; then
    echo "paddock-balancer counted during the rounds:"; echo "$bad"
    [[ " $MODES " == *" https-close "* ]] && echo "  (https-close: wrk stops with up to CONNS=$CONNS handshakes under way per run, warm-ups included: each counts as a failed handshake)"
  else echo "paddock-balancer counted no error, retry, 4xx or 5xx during the rounds"; fi
fi
# Nothing this script started may still listen.
for p in $USED_PORTS; do
  [ -z "$(ss -Hltn "sport = :$p" 2>/dev/null)" ] || echo "warning: 127.0.0.1:$p still listens after the run" >&2
done
exit 0
