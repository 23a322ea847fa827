//! Active health checks: every backend of every route, each interval, by an HTTP
//! GET of the app's health path (2xx or 3xx passes) or a TCP connect. `fall`
//! failures in a row eject a backend; `rise` passes in a row re-admit one that was
//! ejected (by checks or by failed requests).

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::proxy::Shared;
use crate::table::Backend;

pub async fn run(shared: Arc<Shared>) {
    let s = shared.settings.clone();
    let mut tick = tokio::time::interval(s.health_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if *shared.shutdown.borrow() {
            return;
        }
        let table = shared.table.load_full();
        let mut checks = tokio::task::JoinSet::new();
        for r in &table.routes {
            let host = r.domains.iter().find(|d| !d.starts_with('*')).cloned();
            for b in &r.backends {
                if b.drained.load(Relaxed) {
                    continue;
                }
                let (b, path, host) = (b.clone(), r.health.path.clone(), host.clone());
                let timeout = s.health_timeout;
                checks.spawn(async move {
                    let ok = tokio::time::timeout(
                        timeout,
                        check(b.addr, path.as_deref(), host.as_deref()),
                    )
                    .await
                    .unwrap_or(false);
                    (b, ok)
                });
            }
        }
        while let Some(Ok((b, ok))) = checks.join_next().await {
            apply(&b, ok, s.health_rise, s.health_fall);
        }
    }
}

/// One check's result applied to a backend's state.
pub fn apply(b: &Backend, ok: bool, rise: u32, fall: u32) {
    if ok {
        b.check_fails.store(0, Relaxed);
        let n = b.check_passes.fetch_add(1, Relaxed) + 1;
        if n >= rise && b.ejected.swap(false, Relaxed) {
            b.consecutive_failures.store(0, Relaxed);
            tracing::info!(app = %b.app, backend = %b.id, addr = %b.addr, "re-admitted after {n} passing health checks");
        }
    } else {
        b.check_passes.store(0, Relaxed);
        let n = b.check_fails.fetch_add(1, Relaxed) + 1;
        if n >= fall && !b.ejected.swap(true, Relaxed) {
            tracing::warn!(app = %b.app, backend = %b.id, addr = %b.addr, "ejected after {n} failing health checks");
        }
    }
}

async fn check(addr: SocketAddr, path: Option<&str>, host: Option<&str>) -> bool {
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return false;
    };
    let Some(path) = path else { return true };
    let host = host.map(str::to_string).unwrap_or_else(|| addr.to_string());
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: paddock-balancer-health\r\nConnection: close\r\n\r\n"
    );
    if s.write_all(req.as_bytes()).await.is_err() {
        return false;
    }
    let mut buf = [0u8; 16];
    let mut n = 0;
    while n < 12 {
        match s.read(&mut buf[n..]).await {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
    }
    status_passes(&buf[..n])
}

/// `HTTP/1.x 2xx` or `3xx`.
fn status_passes(head: &[u8]) -> bool {
    head.len() >= 12
        && head.starts_with(b"HTTP/1.")
        && matches!(head[9], b'2' | b'3')
        && head[8] == b' '
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        assert!(status_passes(b"HTTP/1.1 200 OK"));
        assert!(status_passes(b"HTTP/1.0 302 Fo"));
        assert!(!status_passes(b"HTTP/1.1 500 In"));
        assert!(!status_passes(b"HTTP/1.1 20"));
        assert!(!status_passes(b"SSH-2.0-OpenSSH"));
    }

    #[test]
    fn fall_ejects_and_rise_readmits() {
        let b = Backend::new("a".into(), "1".into(), "127.0.0.1:1".parse().unwrap(), 1, 1);
        apply(&b, false, 2, 2);
        assert!(!b.ejected.load(Relaxed));
        apply(&b, false, 2, 2);
        assert!(b.ejected.load(Relaxed));
        apply(&b, true, 2, 2);
        assert!(b.ejected.load(Relaxed), "one pass is not enough");
        apply(&b, true, 2, 2);
        assert!(!b.ejected.load(Relaxed));
        // Ejected by failed requests, re-admitted by checks.
        b.failed(1);
        assert!(b.ejected.load(Relaxed));
        apply(&b, true, 2, 2);
        apply(&b, true, 2, 2);
        assert!(!b.ejected.load(Relaxed));
    }
}
