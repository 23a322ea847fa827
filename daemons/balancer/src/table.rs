//! The proxy's routing table: an immutable snapshot (host → app → backends) that
//! the control thread rebuilds from the model after every change and swaps in
//! whole (`ArcSwap`), so a request sees one consistent table and a change never
//! waits for or drops one in flight. Backends are live objects shared across
//! snapshots (their counters, pool and health survive a rebuild); a request holds
//! its backend's `Arc`, so removing a backend lets its in-flight requests finish.

use std::cell::Cell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::model::{HealthSpec, Model, Owner};
use crate::pool::Pool;
use crate::stats::Counters;

/// One backend of one app, as the proxy and the health checker see it.
pub struct Backend {
    pub app: Arc<str>,
    pub id: String,
    pub addr: SocketAddr,
    pub weight: AtomicU32,
    /// Requests (and tunnels) in flight to it.
    pub outstanding: AtomicU64,
    pub draining: AtomicBool,
    /// Drained: nothing was left in flight, or the drain deadline passed.
    pub drained: AtomicBool,
    /// Set at the drain deadline: tunnels and response bodies still open end.
    pub closing: AtomicBool,
    pub close_now: tokio::sync::Notify,
    /// When its drain began (ms since the balancer started; 0: not draining).
    pub drain_started_ms: AtomicU64,
    /// Out of rotation after failures, until health checks re-admit it.
    pub ejected: AtomicBool,
    pub consecutive_failures: AtomicU32,
    pub check_passes: AtomicU32,
    pub check_fails: AtomicU32,
    pub pool: Pool,
    pub stats: Counters,
}

impl Backend {
    pub fn new(
        app: Arc<str>,
        id: String,
        addr: SocketAddr,
        weight: u32,
        pool_idle: usize,
    ) -> Backend {
        Backend {
            app,
            id,
            addr,
            weight: AtomicU32::new(weight),
            outstanding: AtomicU64::new(0),
            draining: AtomicBool::new(false),
            drained: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            close_now: tokio::sync::Notify::new(),
            drain_started_ms: AtomicU64::new(0),
            ejected: AtomicBool::new(false),
            consecutive_failures: AtomicU32::new(0),
            check_passes: AtomicU32::new(0),
            check_fails: AtomicU32::new(0),
            pool: Pool::new(pool_idle),
            stats: Counters::default(),
        }
    }

    /// Takes new requests.
    pub fn in_rotation(&self) -> bool {
        !self.draining.load(Relaxed) && !self.ejected.load(Relaxed)
    }

    pub fn state(&self) -> &'static str {
        if self.drained.load(Relaxed) {
            "drained"
        } else if self.draining.load(Relaxed) {
            "draining"
        } else if self.ejected.load(Relaxed) {
            "ejected"
        } else {
            "up"
        }
    }

    /// A request to it failed (connect refused, reset, timeout): after
    /// `eject_after` in a row it leaves the rotation until health checks pass.
    pub fn failed(&self, eject_after: u32) {
        let n = self.consecutive_failures.fetch_add(1, Relaxed) + 1;
        if n >= eject_after && !self.ejected.swap(true, Relaxed) {
            self.check_passes.store(0, Relaxed);
            tracing::warn!(app = %self.app, backend = %self.id, addr = %self.addr, "ejected after {n} failed requests in a row");
        }
    }

    pub fn succeeded(&self) {
        if self.consecutive_failures.load(Relaxed) != 0 {
            self.consecutive_failures.store(0, Relaxed);
        }
    }

    /// The drain deadline passed: close what is still open.
    pub fn close(&self) {
        self.closing.store(true, Relaxed);
        self.close_now.notify_waiters();
        self.pool.clear();
    }
}

/// One app's route in a snapshot.
pub struct Route {
    pub app: Arc<str>,
    pub owner: Owner,
    pub domains: Vec<String>,
    pub backends: Vec<Arc<Backend>>,
    pub health: HealthSpec,
    pub stats: Arc<Counters>,
}

thread_local! {
    static RNG: Cell<u64> = Cell::new({
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1);
        (t ^ (std::process::id() as u64) << 32) | 1
    });
}

/// xorshift64*: a cheap per-thread random number for picking backends.
pub fn rand_u64() -> u64 {
    RNG.with(|r| {
        let mut x = r.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        r.set(x);
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    })
}

impl Route {
    /// Power of two choices on outstanding requests per unit of weight, among
    /// backends in rotation and not in `tried` (backend addresses); when none is
    /// in rotation, the least loaded ejected one. `None`: none is left.
    pub fn pick(&self, tried: &[usize]) -> Option<&Arc<Backend>> {
        let ok = |b: &&Arc<Backend>| b.in_rotation() && !tried.contains(&(Arc::as_ptr(b) as usize));
        let n = self.backends.len();
        if n == 0 {
            return None;
        }
        // Fast path: two random candidates; fall back to a scan when either is out.
        let i = (rand_u64() % n as u64) as usize;
        let mut j = (rand_u64() % n as u64) as usize;
        if n > 1 && j == i {
            j = (i + 1) % n;
        }
        let (a, b) = (&self.backends[i], &self.backends[j]);
        match (ok(&a), ok(&b)) {
            (true, true) => Some(if load(a) <= load(b) { a } else { b }),
            (true, false) => Some(a),
            (false, true) => Some(b),
            (false, false) => {
                let start = (rand_u64() % n as u64) as usize;
                let scan = |f: &dyn Fn(&&Arc<Backend>) -> bool| {
                    (0..n)
                        .map(|k| &self.backends[(start + k) % n])
                        .filter(|b| f(b))
                        .min_by(|x, y| load(x).total_cmp(&load(y)))
                };
                // Panic mode (as Envoy's): when every backend not yet tried is
                // ejected, try the ejected ones rather than refuse with a 503 — an
                // app that restarted in milliseconds serves again before its health
                // checks re-admit it. Draining backends are never picked.
                scan(&ok).or_else(|| {
                    scan(&|b: &&Arc<Backend>| {
                        !b.draining.load(Relaxed) && !tried.contains(&(Arc::as_ptr(b) as usize))
                    })
                })
            }
        }
    }
}

fn load(b: &Backend) -> f64 {
    (b.outstanding.load(Relaxed) as f64 + 1.0) / b.weight.load(Relaxed).max(1) as f64
}

/// A snapshot: exact and wildcard domains to routes.
#[derive(Default)]
pub struct Table {
    exact: HashMap<String, Arc<Route>>,
    /// `*.apps.example.com` is kept as `apps.example.com`.
    wildcard: HashMap<String, Arc<Route>>,
    pub routes: Vec<Arc<Route>>,
}

/// Whether a Host value (or an absolute-form URI's authority) is a host a
/// browser could send: a DNS name or IPv4 address (letters, digits, `-`, `_`,
/// `.`), or a bracketed IPv6 literal, then at most a numeric port. Anything else
/// (`a.example.com:x@evil.com`, `a/b`, userinfo, spaces) is refused with a 400
/// rather than routed on a prefix and forwarded as written.
pub fn valid_host(host: &str) -> bool {
    let (name, port) = if let Some(rest) = host.strip_prefix('[') {
        let Some(end) = rest.find(']') else {
            return false;
        };
        let literal = &rest[..end];
        if literal.is_empty()
            || !literal
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        {
            return false;
        }
        match &rest[end + 1..] {
            "" => return true,
            p => match p.strip_prefix(':') {
                Some(p) => ("x", Some(p)),
                None => return false,
            },
        }
    } else {
        match host.rsplit_once(':') {
            Some((n, p)) => (n, Some(p)),
            None => (host, None),
        }
    };
    let name_ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    let port_ok = port.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 5
            && p.bytes().all(|b| b.is_ascii_digit())
            && p.parse::<u32>().is_ok_and(|n| n <= 65535)
    });
    name_ok && port_ok
}

/// Strips the port and a trailing dot from a Host value and lowercases it (only
/// when needed, so the common case allocates nothing).
pub fn host_key(host: &str) -> std::borrow::Cow<'_, str> {
    let h = if host.starts_with('[') {
        // An IPv6 literal: keep the brackets, drop a port.
        match host.find(']') {
            Some(end) => &host[..=end],
            None => host,
        }
    } else {
        match host.rfind(':') {
            Some(i) => &host[..i],
            None => host,
        }
    };
    let h = h.strip_suffix('.').unwrap_or(h);
    if h.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(h.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(h)
    }
}

impl Table {
    /// The route for a Host header value: an exact domain first, then the most
    /// specific wildcard (`*.b.example.com` before `*.example.com`).
    pub fn lookup(&self, host: &str) -> Option<&Arc<Route>> {
        let h = host_key(host);
        if let Some(r) = self.exact.get(h.as_ref()) {
            return Some(r);
        }
        if self.wildcard.is_empty() {
            return None;
        }
        let mut rest: &str = h.as_ref();
        while let Some(dot) = rest.find('.') {
            rest = &rest[dot + 1..];
            if let Some(r) = self.wildcard.get(rest) {
                return Some(r);
            }
        }
        None
    }
}

type BackendKey = (Arc<str>, String, SocketAddr);

/// The live objects a rebuild reuses: backends by (app, id, addr), app counters.
#[derive(Default)]
pub struct Live {
    backends: Mutex<HashMap<BackendKey, Arc<Backend>>>,
    apps: Mutex<HashMap<String, Arc<Counters>>>,
    started: Option<Instant>,
}

impl Live {
    pub fn new() -> Live {
        Live {
            started: Some(Instant::now()),
            ..Default::default()
        }
    }

    pub fn now_ms(&self) -> u64 {
        self.started
            .map(|s| s.elapsed().as_millis() as u64)
            .unwrap_or(0)
            + 1
    }

    /// A new snapshot of `model`. Backends kept from the last one keep their state;
    /// a backend's weight and drain flag are updated in place.
    pub fn build(&self, model: &Model, pool_idle: usize) -> Table {
        let mut backends = self.backends.lock().unwrap_or_else(|e| e.into_inner());
        let mut apps = self.apps.lock().unwrap_or_else(|e| e.into_inner());
        let mut next_backends = HashMap::new();
        let mut next_apps = HashMap::new();
        let mut t = Table::default();
        for (name, spec) in &model.apps {
            let app: Arc<str> = Arc::from(name.as_str());
            let bs: Vec<Arc<Backend>> = spec
                .backends
                .iter()
                .map(|b| {
                    let key = (app.clone(), b.id.clone(), b.addr);
                    let live = backends.get(&key).cloned().unwrap_or_else(|| {
                        Arc::new(Backend::new(
                            app.clone(),
                            b.id.clone(),
                            b.addr,
                            b.weight,
                            pool_idle,
                        ))
                    });
                    live.weight.store(b.weight, Relaxed);
                    if b.draining && !live.draining.swap(true, Relaxed) {
                        live.drain_started_ms.store(self.now_ms(), Relaxed);
                    }
                    if !b.draining && live.draining.swap(false, Relaxed) {
                        live.drained.store(false, Relaxed);
                        live.closing.store(false, Relaxed);
                        live.drain_started_ms.store(0, Relaxed);
                    }
                    next_backends.insert(key, live.clone());
                    live
                })
                .collect();
            let stats = apps.get(name).cloned().unwrap_or_default();
            next_apps.insert(name.clone(), stats.clone());
            let route = Arc::new(Route {
                app,
                owner: spec.owner,
                domains: spec.domains.clone(),
                backends: bs,
                health: spec.health.clone(),
                stats,
            });
            for d in &spec.domains {
                match d.strip_prefix("*.") {
                    Some(suffix) => t.wildcard.insert(suffix.to_string(), route.clone()),
                    None => t.exact.insert(d.clone(), route.clone()),
                };
            }
            t.routes.push(route);
        }
        // A removed backend is dropped from the live set; requests holding it finish.
        for (k, b) in backends.iter() {
            if !next_backends.contains_key(k) {
                b.pool.clear();
            }
        }
        *backends = next_backends;
        *apps = next_apps;
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> Model {
        let mut m = Model::default();
        m.set_route("a", &["a.example.com".into()], None).unwrap();
        m.set_route("w", &["*.apps.example.com".into()], None)
            .unwrap();
        m.set_route("deep", &["*.x.apps.example.com".into()], None)
            .unwrap();
        m.add_backend("a", "1", "127.0.0.1:1", 1).unwrap();
        m.add_backend("a", "2", "127.0.0.1:2", 1).unwrap();
        m
    }

    #[test]
    fn only_host_names_and_addresses_with_a_numeric_port_are_valid_hosts() {
        for ok in [
            "a.example.com",
            "A.Example.Com:8080",
            "a.example.com.",
            "localhost:1",
            "127.0.0.1:65535",
            "[::1]",
            "[::1]:443",
            "my_app.localhost",
        ] {
            assert!(valid_host(ok), "{ok} should be valid");
        }
        for bad in [
            "",
            "a.example.com:x@evil.com",
            "evil.com/.apps.example.com",
            "user@a.example.com",
            "a.example.com:",
            "a.example.com:65536",
            "a.example.com:123456",
            "a example.com",
            "[::1",
            "[::1]x",
            "[zz::1]",
            "a.example.com:80:80",
        ] {
            assert!(!valid_host(bad), "{bad:?} should be refused");
        }
    }

    #[test]
    fn hosts_route_exact_then_most_specific_wildcard_case_and_port_ignored() {
        let live = Live::new();
        let t = live.build(&model(), 4);
        let app = |h: &str| t.lookup(h).map(|r| r.app.to_string());
        assert_eq!(app("a.example.com").as_deref(), Some("a"));
        assert_eq!(app("A.Example.Com:8080").as_deref(), Some("a"));
        assert_eq!(app("a.example.com.").as_deref(), Some("a"));
        assert_eq!(app("foo.apps.example.com").as_deref(), Some("w"));
        assert_eq!(app("a.b.apps.example.com").as_deref(), Some("w"));
        assert_eq!(app("y.x.apps.example.com").as_deref(), Some("deep"));
        assert_eq!(
            app("apps.example.com"),
            None,
            "a wildcard does not match its own base"
        );
        assert_eq!(app("b.example.com"), None);
        assert_eq!(app("[::1]:80"), None);
    }

    #[test]
    fn a_rebuild_keeps_backend_state_and_drain_flags_apply_in_place() {
        let live = Live::new();
        let mut m = model();
        let t1 = live.build(&m, 4);
        let b1 = t1.lookup("a.example.com").unwrap().backends[0].clone();
        b1.outstanding.store(7, Relaxed);
        m.drain_backend("a", "1").unwrap();
        let t2 = live.build(&m, 4);
        let b2 = t2.lookup("a.example.com").unwrap().backends[0].clone();
        assert!(Arc::ptr_eq(&b1, &b2));
        assert!(
            b1.draining.load(Relaxed),
            "the old snapshot's object sees the drain"
        );
        let r = t2.lookup("a.example.com").unwrap();
        for _ in 0..50 {
            assert_eq!(
                r.pick(&[]).unwrap().id,
                "2",
                "a draining backend gets nothing new"
            );
        }
    }

    #[test]
    fn p2c_prefers_the_less_loaded_and_skips_tried_and_ejected() {
        let live = Live::new();
        let t = live.build(&model(), 4);
        let r = t.lookup("a.example.com").unwrap();
        r.backends[0].outstanding.store(10, Relaxed);
        for _ in 0..50 {
            assert_eq!(r.pick(&[]).unwrap().id, "2");
        }
        let tried = [Arc::as_ptr(&r.backends[1]) as usize];
        assert_eq!(r.pick(&tried).unwrap().id, "1");
        r.backends[0].failed(1);
        assert_eq!(
            r.pick(&tried).unwrap().id,
            "1",
            "all ejected: the ejected are tried (panic mode)"
        );
        r.backends[1].failed(1);
        for _ in 0..20 {
            assert!(r.pick(&[]).is_some(), "panic mode");
        }
        let both = [
            Arc::as_ptr(&r.backends[0]) as usize,
            Arc::as_ptr(&r.backends[1]) as usize,
        ];
        assert!(r.pick(&both).is_none(), "all tried: none left");
        r.backends[0].draining.store(true, Relaxed);
        r.backends[1].draining.store(true, Relaxed);
        assert!(
            r.pick(&[]).is_none(),
            "draining ones never, even in panic mode"
        );
    }

    #[test]
    fn weights_shift_traffic() {
        let mut m = model();
        m.add_backend("a", "2", "127.0.0.1:2", 4).unwrap();
        let live = Live::new();
        let t = live.build(&m, 4);
        let r = t.lookup("a.example.com").unwrap();
        // Simulate steady in-flight load: each pick adds one outstanding request.
        for _ in 0..100 {
            r.pick(&[]).unwrap().outstanding.fetch_add(1, Relaxed);
        }
        let heavy = r.backends[1].outstanding.load(Relaxed);
        assert!(heavy >= 70, "weight 4 of 5 took {heavy} of 100");
    }
}
