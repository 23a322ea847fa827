-- wrk script for ops/bench/balancer/run.sh.
--
-- 1. WRK_CONNECT=IP: connect there whatever the URL's host. wrk takes the TLS SNI
--    from the URL's host, so `https://bench.local:PORT/` with WRK_CONNECT=127.0.0.1
--    sends SNI bench.local without an /etc/hosts entry (script_create loads this
--    file before wrk calls wrk.resolve, so the override is the one used).
-- 2. At the end, one machine-readable line (latencies in microseconds):
--    RESULT requests=N duration_us=N rps=F p50_us=N p99_us=N connect=N read=N
--           write=N status=N timeout=N
local connect_to = os.getenv("WRK_CONNECT")
if connect_to and connect_to ~= "" then
  wrk.resolve = function(host, service)
    wrk.addrs = wrk.lookup(connect_to, service)
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "RESULT requests=%d duration_us=%d rps=%.1f p50_us=%d p99_us=%d connect=%d read=%d write=%d status=%d timeout=%d\n",
    summary.requests, summary.duration,
    summary.requests / (summary.duration / 1e6),
    latency:percentile(50), latency:percentile(99),
    e.connect, e.read, e.write, e.status, e.timeout))
end
