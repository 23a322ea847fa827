//! The admin port: `/metrics` (Prometheus text), `/stats.json` (what
//! `balancer.stats` answers) and `/` (a small human page, like HAProxy's).

use std::fmt::Write as _;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{json, Value};

use crate::proxy::Shared;
use crate::stats::{html, label};

/// Every app and backend with its counters and state, and the balancer's own.
pub fn stats_json(shared: &Shared) -> Value {
    let table = shared.table.load();
    let apps: Vec<Value> = table
        .routes
        .iter()
        .map(|r| {
            json!({
                "app": &*r.app,
                "owner": r.owner.as_str(),
                "domains": r.domains,
                "stats": r.stats.json(),
                "backends": r.backends.iter().map(|b| json!({
                    "id": b.id,
                    "addr": b.addr.to_string(),
                    "weight": b.weight.load(Relaxed),
                    "state": b.state(),
                    "active": b.outstanding.load(Relaxed),
                    "pooled_idle": b.pool.idle(),
                    "stats": b.stats.json(),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({"balancer": shared.global.json(), "apps": apps})
}

pub fn prometheus(shared: &Shared) -> String {
    let mut out = crate::stats::Families::default();
    let g = &shared.global;
    for (name, kind, help, v) in [
        (
            "paddock_balancer_connections_active",
            "gauge",
            "Client connections open",
            g.connections_active.load(Relaxed),
        ),
        (
            "paddock_balancer_connections_total",
            "counter",
            "Client connections accepted",
            g.connections_total.load(Relaxed),
        ),
        (
            "paddock_balancer_tls_handshake_failures_total",
            "counter",
            "TLS handshakes that failed",
            g.tls_handshake_failures.load(Relaxed),
        ),
        (
            "paddock_balancer_tls_abandoned_total",
            "counter",
            "TLS connections closed before any handshake",
            g.tls_abandoned.load(Relaxed),
        ),
        (
            "paddock_balancer_unknown_host_total",
            "counter",
            "Requests for a host no app is routed for",
            g.unknown_host.load(Relaxed),
        ),
        (
            "paddock_balancer_bad_requests_total",
            "counter",
            "Requests refused as malformed",
            g.bad_requests.load(Relaxed),
        ),
        (
            "paddock_balancer_retries_total",
            "counter",
            "Requests sent again to another backend",
            g.retries.load(Relaxed),
        ),
        (
            "paddock_balancer_router_log_dropped_total",
            "counter",
            "Router log lines dropped on a full queue",
            g.log_dropped.load(Relaxed),
        ),
        (
            "paddock_balancer_stale_tables_total",
            "counter",
            "Scheduler route tables ignored for a stale fencing token",
            g.stale_tables.load(Relaxed),
        ),
    ] {
        out.add(name, kind, help, "", "", v);
    }
    let table = shared.table.load();
    for r in &table.routes {
        let app = label(&r.app);
        r.stats.prometheus(&mut out, &format!("app=\"{app}\""));
        for b in &r.backends {
            let l = format!("app=\"{app}\",backend=\"{}\"", label(&b.id));
            b.stats.prometheus(&mut out, &l);
            out.add(
                "paddock_balancer_backend_active",
                "gauge",
                "Requests in flight to the backend",
                "",
                &l,
                b.outstanding.load(Relaxed),
            );
            out.add(
                "paddock_balancer_backend_up",
                "gauge",
                "1 when the backend is in rotation",
                "",
                &l,
                u8::from(b.state() == "up"),
            );
        }
    }
    out.render()
}

pub fn page(shared: &Shared) -> String {
    let mut out = String::from("<!doctype html><html><head><title>paddock-balancer</title><style>body{font-family:sans-serif}table{border-collapse:collapse}td,th{border:1px solid #999;padding:2px 6px;text-align:right}.up{background:#cfc}.ejected{background:#fcc}.draining,.drained{background:#ffc}</style></head><body><h1>paddock-balancer</h1>");
    let g = &shared.global;
    let _ = write!(
        out,
        "<p>connections: {} active, {} total · retries {} · unknown host {}</p>",
        g.connections_active.load(Relaxed),
        g.connections_total.load(Relaxed),
        g.retries.load(Relaxed),
        g.unknown_host.load(Relaxed)
    );
    out.push_str("<table><tr><th>app / backend</th><th>state</th><th>active</th><th>requests</th><th>2xx</th><th>4xx</th><th>5xx</th><th>p50 ms</th><th>p99 ms</th></tr>");
    let table = shared.table.load();
    let q = crate::stats::q_text;
    for r in &table.routes {
        let s = &r.stats;
        let _ = write!(
            out,
            "<tr><th style=\"text-align:left\">{} <small>({})</small></th><td></td><td></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            html(&r.app),
            html(&r.domains.join(", ")),
            s.requests.load(Relaxed),
            s.status[1].load(Relaxed),
            s.status[3].load(Relaxed),
            s.status[4].load(Relaxed),
            q(s.quantile_ms(0.5)),
            q(s.quantile_ms(0.99)),
        );
        for b in &r.backends {
            let s = &b.stats;
            let _ = write!(
                out,
                "<tr class=\"{st}\"><td style=\"text-align:left\">{} {}</td><td>{st}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                html(&b.id),
                b.addr,
                b.outstanding.load(Relaxed),
                s.requests.load(Relaxed),
                s.status[1].load(Relaxed),
                s.status[3].load(Relaxed),
                s.status[4].load(Relaxed),
                q(s.quantile_ms(0.5)),
                q(s.quantile_ms(0.99)),
                st = b.state(),
            );
        }
    }
    out.push_str("</table></body></html>\n");
    out
}

pub async fn serve(shared: Arc<Shared>, listener: std::net::TcpListener) {
    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
        return;
    };
    loop {
        let Ok((s, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            continue;
        };
        let sh = shared.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let sh = sh.clone();
                async move {
                    let (ct, body, status) = match req.uri().path() {
                        "/metrics" => {
                            ("text/plain; version=0.0.4", prometheus(&sh), StatusCode::OK)
                        }
                        "/stats.json" => (
                            "application/json",
                            stats_json(&sh).to_string(),
                            StatusCode::OK,
                        ),
                        "/" => ("text/html; charset=utf-8", page(&sh), StatusCode::OK),
                        _ => (
                            "text/plain",
                            "not found: try /, /metrics or /stats.json\n".into(),
                            StatusCode::NOT_FOUND,
                        ),
                    };
                    let mut r = Response::new(Full::new(Bytes::from(body)));
                    *r.status_mut() = status;
                    r.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static(ct),
                    );
                    Ok::<_, std::convert::Infallible>(r)
                }
            });
            let mut b = hyper::server::conn::http1::Builder::new();
            b.timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10));
            let _ = b.serve_connection(TokioIo::new(s), svc).await;
        });
    }
}
