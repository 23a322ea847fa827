//! Counters the proxy bumps on its hot path (atomics only, no locks, no
//! allocation) and their three views: JSON for `balancer.stats`, Prometheus text
//! and a small human page on the admin port.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Upper bounds of the latency buckets, in microseconds (the last is +Inf).
pub const BUCKETS_US: [u64; 14] = [
    500, 1_000, 2_000, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000, 5_000_000, 10_000_000,
];

#[derive(Default)]
pub struct Counters {
    pub requests: AtomicU64,
    /// 1xx … 5xx.
    pub status: [AtomicU64; 5],
    pub bytes: AtomicU64,
    latency: [AtomicU64; BUCKETS_US.len() + 1],
    latency_sum_us: AtomicU64,
}

impl Counters {
    pub fn record(&self, status: u16, latency_us: u64, bytes: u64) {
        self.requests.fetch_add(1, Relaxed);
        let class = (status / 100).clamp(1, 5) as usize - 1;
        self.status[class].fetch_add(1, Relaxed);
        self.bytes.fetch_add(bytes, Relaxed);
        let i = BUCKETS_US
            .iter()
            .position(|b| latency_us <= *b)
            .unwrap_or(BUCKETS_US.len());
        self.latency[i].fetch_add(1, Relaxed);
        self.latency_sum_us.fetch_add(latency_us, Relaxed);
    }

    /// A latency quantile (0..1) as the upper bound of its bucket, in ms.
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        let counts: Vec<u64> = self.latency.iter().map(|c| c.load(Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let want = (q * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= want {
                return Some(
                    BUCKETS_US
                        .get(i)
                        .map(|b| *b as f64 / 1000.0)
                        .unwrap_or(f64::INFINITY),
                );
            }
        }
        None
    }

    pub fn json(&self) -> serde_json::Value {
        let s: Vec<u64> = self.status.iter().map(|c| c.load(Relaxed)).collect();
        serde_json::json!({
            "requests": self.requests.load(Relaxed),
            "status": {"1xx": s[0], "2xx": s[1], "3xx": s[2], "4xx": s[3], "5xx": s[4]},
            "bytes": self.bytes.load(Relaxed),
            "latency_ms": {
                "p50": q_json(self.quantile_ms(0.5)), "p90": q_json(self.quantile_ms(0.9)),
                "p99": q_json(self.quantile_ms(0.99)),
                "buckets_le_ms": BUCKETS_US.iter().map(|b| *b as f64 / 1000.0).collect::<Vec<_>>(),
                "counts": self.latency.iter().map(|c| c.load(Relaxed)).collect::<Vec<_>>(),
                "sum_ms": self.latency_sum_us.load(Relaxed) as f64 / 1000.0,
            },
        })
    }

    /// Prometheus samples for these counters with `labels` (already escaped).
    pub fn prometheus(&self, out: &mut Families, labels: &str) {
        out.add(
            "paddock_balancer_requests_total",
            "counter",
            "Requests answered",
            "",
            labels,
            self.requests.load(Relaxed),
        );
        for (i, c) in self.status.iter().enumerate() {
            out.add(
                "paddock_balancer_responses_total",
                "counter",
                "Responses by status class",
                "",
                &format!("{labels},class=\"{}xx\"", i + 1),
                c.load(Relaxed),
            );
        }
        out.add(
            "paddock_balancer_response_bytes_total",
            "counter",
            "Response body bytes sent",
            "",
            labels,
            self.bytes.load(Relaxed),
        );
        const H: &str = "paddock_balancer_request_duration_seconds";
        const HELP: &str = "Time from the request to the end of its response";
        let mut cum = 0;
        for (i, c) in self.latency.iter().enumerate() {
            cum += c.load(Relaxed);
            let le = BUCKETS_US
                .get(i)
                .map(|b| format!("{}", *b as f64 / 1e6))
                .unwrap_or_else(|| "+Inf".into());
            out.add(
                H,
                "histogram",
                HELP,
                "_bucket",
                &format!("{labels},le=\"{le}\""),
                cum,
            );
        }
        out.add(
            H,
            "histogram",
            HELP,
            "_sum",
            labels,
            self.latency_sum_us.load(Relaxed) as f64 / 1e6,
        );
        out.add(H, "histogram", HELP, "_count", labels, cum);
    }
}

/// A quantile for JSON: null with no requests, `"+Inf"` beyond the last bucket
/// (JSON has no infinity).
fn q_json(q: Option<f64>) -> serde_json::Value {
    match q {
        Some(x) if x.is_finite() => serde_json::json!(x),
        Some(_) => serde_json::json!("+Inf"),
        None => serde_json::Value::Null,
    }
}

/// A quantile for people: `-` with no requests, `>10000` beyond the last bucket.
pub fn q_text(q: Option<f64>) -> String {
    match q {
        Some(x) if x.is_finite() => format!("{x}"),
        Some(_) => format!(">{}", BUCKETS_US[BUCKETS_US.len() - 1] / 1000),
        None => "-".into(),
    }
}

/// Balancer-wide counters.
/// Prometheus text exposition, grouped by metric family: every sample of a
/// family together after its `# HELP` and `# TYPE` lines, as the format requires
/// (samples are added app by app and backend by backend, in any order).
#[derive(Default)]
pub struct Families {
    fams: Vec<Family>,
}

struct Family {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    samples: String,
}

impl Families {
    /// One sample of family `name`: `name` + `suffix` (`_bucket`, `_sum`, …),
    /// with `labels` (already escaped; may be empty).
    pub fn add(
        &mut self,
        name: &'static str,
        kind: &'static str,
        help: &'static str,
        suffix: &str,
        labels: &str,
        value: impl std::fmt::Display,
    ) {
        let i = match self.fams.iter().position(|f| f.name == name) {
            Some(i) => i,
            None => {
                self.fams.push(Family {
                    name,
                    kind,
                    help,
                    samples: String::new(),
                });
                self.fams.len() - 1
            }
        };
        let out = &mut self.fams[i].samples;
        if labels.is_empty() {
            let _ = writeln!(out, "{name}{suffix} {value}");
        } else {
            let _ = writeln!(out, "{name}{suffix}{{{labels}}} {value}");
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        for f in &self.fams {
            let _ = writeln!(out, "# HELP {} {}", f.name, f.help);
            let _ = writeln!(out, "# TYPE {} {}", f.name, f.kind);
            out.push_str(&f.samples);
        }
        out
    }
}

#[derive(Default)]
pub struct Global {
    pub connections_active: AtomicU64,
    pub connections_total: AtomicU64,
    pub tls_handshake_failures: AtomicU64,
    /// TLS connections closed (or silent past the header deadline) before any
    /// handshake: not failures.
    pub tls_abandoned: AtomicU64,
    pub unknown_host: AtomicU64,
    pub bad_requests: AtomicU64,
    pub retries: AtomicU64,
    pub log_dropped: AtomicU64,
    pub stale_tables: AtomicU64,
}

impl Global {
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "connections_active": self.connections_active.load(Relaxed),
            "connections_total": self.connections_total.load(Relaxed),
            "tls_handshake_failures": self.tls_handshake_failures.load(Relaxed),
            "tls_abandoned": self.tls_abandoned.load(Relaxed),
            "unknown_host": self.unknown_host.load(Relaxed),
            "bad_requests": self.bad_requests.load(Relaxed),
            "retries": self.retries.load(Relaxed),
            "router_log_dropped": self.log_dropped.load(Relaxed),
            "stale_tables": self.stale_tables.load(Relaxed),
        })
    }
}

/// A Prometheus label value, escaped.
pub fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Text for an HTML page, escaped.
pub fn html(v: &str) -> String {
    v.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_come_from_the_buckets() {
        let c = Counters::default();
        assert_eq!(c.quantile_ms(0.5), None);
        for _ in 0..90 {
            c.record(200, 300, 10);
        }
        for _ in 0..10 {
            c.record(502, 40_000, 0);
        }
        assert_eq!(c.quantile_ms(0.5), Some(0.5));
        assert_eq!(c.quantile_ms(0.99), Some(50.0));
        let slow = Counters::default();
        slow.record(200, 60_000_000, 0);
        assert_eq!(slow.json()["latency_ms"]["p99"], "+Inf");
        assert_eq!(q_text(slow.quantile_ms(0.99)), ">10000");
        assert_eq!(q_text(None), "-");
        let j = c.json();
        assert_eq!(j["status"]["2xx"], 90);
        assert_eq!(j["status"]["5xx"], 10);
        assert_eq!(j["bytes"], 900);
        assert_eq!(j["latency_ms"]["p50"], 0.5);
        let mut f = Families::default();
        c.prometheus(&mut f, "app=\"a\"");
        c.prometheus(&mut f, "app=\"b\"");
        let p = f.render();
        // One group per family, its HELP and TYPE first.
        assert_eq!(
            p.matches("# TYPE paddock_balancer_requests_total counter")
                .count(),
            1
        );
        let at = |s: &str| p.find(s).unwrap_or_else(|| panic!("{s} in {p}"));
        assert!(at("requests_total{app=\"b\"}") < at("# TYPE paddock_balancer_responses_total"));
        assert!(p.contains("# TYPE paddock_balancer_request_duration_seconds histogram"));
        assert!(
            p.contains("paddock_balancer_requests_total{app=\"a\"} 100"),
            "{p}"
        );
        assert!(p.contains("le=\"+Inf\"} 100"), "{p}");
    }

    #[test]
    fn labels_and_html_are_escaped() {
        assert_eq!(label("a\"b\\\n"), "a\\\"b\\\\\\n");
        assert_eq!(html("<a href=\"x\">&"), "&lt;a href=&quot;x&quot;&gt;&amp;");
    }
}
