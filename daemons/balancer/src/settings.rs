//! `[daemons.balancer]`: the typed section as written in the cluster file, and the
//! validated settings the balancer works with.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use paddock_config::{ClusterConfig, ConfigError, Ms};
use serde::Deserialize;

/// The section as written (every key optional but `http`; a misspelt key fails the
/// start with exit 78, naming `daemons.balancer.KEY`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BalancerSection {
    /// PUB endpoint for `backend.drained` (bound by the daemon runtime).
    #[serde(rename = "pub")]
    pub publish: Option<String>,
    /// The public HTTP listener, `tcp://host:port`.
    pub http: Option<String>,
    /// The public HTTPS listener, `tcp://host:port` (none: no HTTPS).
    pub https: Option<String>,
    /// Stats as Prometheus text (`/metrics`) and a human page (`/`), `tcp://host:port`.
    pub admin: Option<String>,
    /// Where router log lines are PUSHed (a logger's pull endpoint).
    pub log_sink: Option<String>,
    /// Also write router log lines to the balancer's own log (INFO, target `router`).
    pub router_log: bool,
    /// Where routes and certificates are kept. Default: `<state dir>/balancer`.
    pub dir: Option<PathBuf>,
    /// Proxy threads, each accepting and serving its own connections (0: one per
    /// CPU).
    pub threads: usize,
    pub max_connections: usize,
    /// Request line and headers, in bytes (431 above it).
    pub max_header_bytes: usize,
    pub max_headers: usize,
    /// A request body, in bytes (413 above it).
    pub max_body_bytes: u64,
    /// The whole request header must arrive within this (slowloris); an idle
    /// keep-alive connection waiting for its next request is closed after it too.
    pub header_timeout_ms: Ms,
    /// A backend must start its response within this (else 504).
    pub request_timeout_ms: Ms,
    /// A client that reads nothing of its response for this long is cut off.
    pub send_timeout_ms: Ms,
    pub connect_timeout_ms: Ms,
    /// A drained backend's requests and websockets left at this point are closed.
    pub drain_timeout_ms: Ms,
    /// Consecutive failed requests that eject a backend until health checks pass.
    pub eject_after: u32,
    pub health_interval_ms: Ms,
    pub health_timeout_ms: Ms,
    /// Consecutive passing checks that re-admit an ejected backend.
    pub health_rise: u32,
    /// Consecutive failing checks that eject a backend.
    pub health_fall: u32,
    /// How often the schedulers' route tables are fetched whole (`routes.snapshot`).
    pub resync_ms: Ms,
    /// Idle pooled connections kept per backend (and proxy thread).
    pub pool_idle_per_backend: usize,
    /// An idle pooled connection older than this is closed, not reused (keep it
    /// below the backends' own keep-alive timeout).
    pub pool_idle_timeout_ms: Ms,
    /// An upgrade (SIGUSR2) hands over and the old process drains for up to this.
    pub handoff_drain_ms: Ms,
}

impl Default for BalancerSection {
    fn default() -> Self {
        BalancerSection {
            publish: None,
            http: None,
            https: None,
            admin: None,
            log_sink: None,
            router_log: false,
            dir: None,
            threads: 0,
            max_connections: 10_000,
            max_header_bytes: 32 * 1024,
            max_headers: 100,
            max_body_bytes: 100 * 1024 * 1024,
            header_timeout_ms: Ms::from_millis(10_000),
            request_timeout_ms: Ms::from_millis(30_000),
            send_timeout_ms: Ms::from_millis(30_000),
            connect_timeout_ms: Ms::from_millis(3_000),
            drain_timeout_ms: Ms::from_millis(30_000),
            eject_after: 3,
            health_interval_ms: Ms::from_millis(2_000),
            health_timeout_ms: Ms::from_millis(1_000),
            health_rise: 2,
            health_fall: 3,
            resync_ms: Ms::from_millis(10_000),
            pool_idle_per_backend: 128,
            pool_idle_timeout_ms: Ms::from_millis(1500),
            handoff_drain_ms: Ms::from_millis(30_000),
        }
    }
}

/// The balancer's validated settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub http: SocketAddr,
    pub https: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub log_sink: Option<String>,
    pub router_log: bool,
    pub dir: PathBuf,
    pub threads: usize,
    pub max_connections: usize,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub max_body_bytes: u64,
    pub header_timeout: Duration,
    pub request_timeout: Duration,
    pub send_timeout: Duration,
    pub connect_timeout: Duration,
    pub drain_timeout: Duration,
    pub eject_after: u32,
    pub health_interval: Duration,
    pub health_timeout: Duration,
    pub health_rise: u32,
    pub health_fall: u32,
    pub resync: Duration,
    pub pool_idle_per_backend: usize,
    pub pool_idle_timeout: Duration,
    pub handoff_drain: Duration,
}

/// `tcp://host:port` as a socket address (the listeners are plain TCP).
pub fn tcp_addr(cfg: &ClusterConfig, key: &str, v: &str) -> Result<SocketAddr, ConfigError> {
    let bad = |why: &str| cfg.invalid(&format!("daemons.balancer.{key}"), format!("`{v}` {why}"));
    let rest = v
        .strip_prefix("tcp://")
        .ok_or_else(|| bad("is not tcp://host:port"))?;
    use std::net::ToSocketAddrs;
    rest.to_socket_addrs()
        .map_err(|_| bad("is not tcp://host:port with a resolvable host"))?
        .next()
        .ok_or_else(|| bad("resolves to no address"))
}

impl Settings {
    pub fn from_config(cfg: &ClusterConfig) -> Result<Settings, ConfigError> {
        let s: BalancerSection = cfg.section("balancer")?;
        let http = s.http.as_deref().ok_or_else(|| {
            cfg.invalid(
                "daemons.balancer.http",
                "the public HTTP listener is required (tcp://host:port)".into(),
            )
        })?;
        let http = tcp_addr(cfg, "http", http)?;
        let https = s
            .https
            .as_deref()
            .map(|v| tcp_addr(cfg, "https", v))
            .transpose()?;
        let admin = s
            .admin
            .as_deref()
            .map(|v| tcp_addr(cfg, "admin", v))
            .transpose()?;
        if let Some(e) = s
            .log_sink
            .as_deref()
            .filter(|e| !paddock_config::is_endpoint(e))
        {
            return Err(cfg.invalid(
                "daemons.balancer.log_sink",
                format!("`{e}` is not tcp://host:port or ipc://path"),
            ));
        }
        for (key, v) in [
            ("max_connections", s.max_connections as u64),
            ("max_headers", s.max_headers as u64),
            ("max_body_bytes", s.max_body_bytes),
            ("eject_after", s.eject_after as u64),
            ("health_rise", s.health_rise as u64),
            ("health_fall", s.health_fall as u64),
        ] {
            if v == 0 {
                return Err(cfg.invalid(
                    &format!("daemons.balancer.{key}"),
                    "must be at least 1".into(),
                ));
            }
        }
        // hyper's read buffer cannot be smaller than 8 KiB.
        if !(8192..=1024 * 1024).contains(&s.max_header_bytes) {
            return Err(cfg.invalid(
                "daemons.balancer.max_header_bytes",
                "must lie between 8192 and 1048576".into(),
            ));
        }
        for (key, v) in [
            ("header_timeout_ms", s.header_timeout_ms),
            ("request_timeout_ms", s.request_timeout_ms),
            ("send_timeout_ms", s.send_timeout_ms),
            ("connect_timeout_ms", s.connect_timeout_ms),
            ("health_interval_ms", s.health_interval_ms),
            ("health_timeout_ms", s.health_timeout_ms),
            ("resync_ms", s.resync_ms),
        ] {
            if v.get() < Duration::from_millis(10) {
                return Err(cfg.invalid(
                    &format!("daemons.balancer.{key}"),
                    "must be at least 10 ms".into(),
                ));
            }
        }
        let threads = if s.threads == 0 {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        } else {
            s.threads
        };
        Ok(Settings {
            http,
            https,
            admin,
            log_sink: s.log_sink,
            router_log: s.router_log,
            dir: s.dir.unwrap_or_else(|| cfg.state_dir.join("balancer")),
            threads,
            max_connections: s.max_connections,
            max_header_bytes: s.max_header_bytes,
            max_headers: s.max_headers,
            max_body_bytes: s.max_body_bytes,
            header_timeout: s.header_timeout_ms.get(),
            request_timeout: s.request_timeout_ms.get(),
            send_timeout: s.send_timeout_ms.get(),
            connect_timeout: s.connect_timeout_ms.get(),
            drain_timeout: s.drain_timeout_ms.get(),
            eject_after: s.eject_after,
            health_interval: s.health_interval_ms.get(),
            health_timeout: s.health_timeout_ms.get(),
            health_rise: s.health_rise,
            health_fall: s.health_fall,
            resync: s.resync_ms.get(),
            pool_idle_per_backend: s.pool_idle_per_backend,
            pool_idle_timeout: s.pool_idle_timeout_ms.get(),
            handoff_drain: s.handoff_drain_ms.get(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(extra: &str) -> Result<Settings, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "node = \"n\"\nsigning_key = \"k\"\n[keys]\nk = \"{}\"\n[cluster]\nheartbeats = [\"tcp://127.0.0.1:7111\"]\n[daemons.balancer]\nrpc = \"tcp://127.0.0.1:7105\"\n{extra}\n",
            "00".repeat(32)
        );
        let p = dir.path().join("paddock.toml");
        std::fs::write(&p, text).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        Settings::from_config(&ClusterConfig::load(&p).unwrap())
    }

    #[test]
    fn bad_settings_are_named() {
        let e = load("").unwrap_err().to_string();
        assert!(e.contains("daemons.balancer.http"), "{e}");
        let ok = "http = \"tcp://127.0.0.1:8080\"\n";
        assert!(load(ok).is_ok());
        for (extra, key) in [
            ("health_interval_ms = 0", "health_interval_ms"),
            ("resync_ms = 5", "resync_ms"),
            ("header_timeout_ms = 0", "header_timeout_ms"),
            ("max_header_bytes = 4096", "max_header_bytes"),
            ("max_connections = 0", "max_connections"),
            ("https = \"localhost\"", "https"),
            ("htp = \"tcp://127.0.0.1:1\"", "htp"),
        ] {
            let e = load(&format!("{ok}{extra}")).unwrap_err().to_string();
            assert!(
                e.contains(&format!("daemons.balancer.{key}")),
                "{extra}: {e}"
            );
        }
    }

    #[test]
    fn shipped_example_configs_have_a_valid_balancer_section() {
        for (p, cfg) in paddock_config::shipped_examples() {
            let s = Settings::from_config(&cfg).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            assert_eq!(s.http.port(), 80);
        }
    }
}
