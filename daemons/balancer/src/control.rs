//! The balancer's control plane, on the daemon runtime's thread: rpc kinds, the
//! schedulers' route tables, drain completion events, router log shipping and the
//! upgrade handoff. Every change goes model → disk → a new table snapshot.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use paddock_daemon::{body, Ctx, Routes};
use paddock_wire::{kinds, Code, Envelope, WireError};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::model::{HealthSpec, Model, TableApp};
use crate::plane;

struct State {
    model: Model,
    dir: PathBuf,
    handing_over: bool,
}

type Shared = Rc<RefCell<State>>;

/// Applies `f` to a copy of the model; when it changed, persists it, then swaps in
/// the new table (and certificates). A refused change, or one that cannot be
/// persisted, changes nothing.
fn commit<R>(
    st: &Shared,
    f: impl FnOnce(&mut Model) -> Result<R, WireError>,
) -> Result<R, WireError> {
    let mut s = st.borrow_mut();
    if s.handing_over {
        // The successor has read the routes already: a change now would be lost.
        return Err(WireError::unavailable(
            "the balancer is handing over to its successor; retry in a moment",
        ));
    }
    let mut next = s.model.clone();
    let r = f(&mut next)?;
    if next != s.model {
        next.save(&s.dir).map_err(|e| {
            WireError::internal(format!(
                "cannot persist the routes in {}: {e}",
                s.dir.display()
            ))
        })?;
        let p = plane();
        let certs_changed = next.certs != s.model.certs;
        p.shared.table.store(Arc::new(
            p.live.build(&next, p.shared.settings.pool_idle_per_backend),
        ));
        if certs_changed {
            p.resolver.set(&next.certs);
        }
        s.model = next;
    }
    Ok(r)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteSet {
    app: String,
    domains: Vec<String>,
    #[serde(default)]
    health: Option<HealthSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AppRef {
    app: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BackendAdd {
    app: String,
    id: String,
    addr: String,
    #[serde(default = "crate::model::one")]
    weight: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BackendRef {
    app: String,
    id: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CertSet {
    domains: Vec<String>,
    cert_pem: String,
    key_pem: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CertRemove {
    domains: Vec<String>,
}

/// `routes.table` (a snapshot reply carries `ok` too, so unknown fields pass).
#[derive(Deserialize)]
struct RoutesTable {
    token: u64,
    apps: Vec<TableApp>,
}

fn route<F>(routes: Routes, st: &Shared, kind: &str, f: F) -> Routes
where
    F: Fn(&Shared, &Envelope) -> Result<Value, WireError> + 'static,
{
    let st = st.clone();
    routes.on(kind, move |env| {
        let r = f(&st, &env);
        async move { r }
    })
}

pub(crate) async fn setup(ctx: Ctx, fds: Vec<(String, RawFd)>) -> anyhow::Result<Routes> {
    let p = plane();
    // Read again now that the pid lock is ours: a predecessor may have changed
    // the routes after this process first read them.
    let model = match Model::load(&p.shared.settings.dir) {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!("{e:#}; keeping the routes read at start");
            p.model.clone()
        }
    };
    if model != p.model {
        p.shared.table.store(Arc::new(
            p.live
                .build(&model, p.shared.settings.pool_idle_per_backend),
        ));
        p.resolver.set(&model.certs);
    }
    let st: Shared = Rc::new(RefCell::new(State {
        model,
        dir: p.shared.settings.dir.clone(),
        handing_over: false,
    }));
    // A successor started by an upgrade becomes systemd's main process.
    let _ = sd_notify_mainpid();
    {
        let c = ctx.clone();
        actix_rt::spawn(async move {
            c.shutdown_started().await;
            plane().shared.shutdown.send_replace(true);
        });
    }
    spawn_drain_watcher(&ctx);
    spawn_log_shipper(&ctx);
    spawn_scheduler_sync(&ctx, &st);
    spawn_upgrade_signal(&ctx, &st, fds.clone());

    let mut routes = Routes::new();
    routes = route(routes, &st, kinds::ROUTE_SET, |st, env| {
        let b: RouteSet = body(env)?;
        let domains = commit(st, |m| {
            m.set_route(&b.app, &b.domains, b.health.clone())?;
            Ok(m.apps[&b.app].domains.clone())
        })?;
        Ok(json!({"app": b.app, "domains": domains}))
    });
    routes = route(routes, &st, kinds::ROUTE_REMOVE, |st, env| {
        let b: AppRef = body(env)?;
        commit(st, |m| m.remove_route(&b.app))?;
        Ok(json!({"app": b.app}))
    });
    routes = route(routes, &st, kinds::ROUTES_LIST, |st, _env| {
        Ok(st.borrow().model.listing())
    });
    routes = route(routes, &st, kinds::BACKEND_ADD, |st, env| {
        let b: BackendAdd = body(env)?;
        commit(st, |m| m.add_backend(&b.app, &b.id, &b.addr, b.weight))?;
        Ok(json!({"app": b.app, "id": b.id}))
    });
    routes = route(routes, &st, kinds::BACKEND_DRAIN, |st, env| {
        let b: BackendRef = body(env)?;
        let already = commit(st, |m| m.drain_backend(&b.app, &b.id))?;
        Ok(
            json!({"app": b.app, "id": b.id, "already_draining": already,
                  "deadline_ms": plane().shared.settings.drain_timeout.as_millis() as u64}),
        )
    });
    routes = route(routes, &st, kinds::BACKEND_REMOVE, |st, env| {
        let b: BackendRef = body(env)?;
        commit(st, |m| m.remove_backend(&b.app, &b.id))?;
        Ok(json!({"app": b.app, "id": b.id}))
    });
    routes = route(routes, &st, kinds::CERT_SET, |st, env| {
        let b: CertSet = body(env)?;
        crate::tls::certified_key(&b.cert_pem, &b.key_pem).map_err(WireError::invalid)?;
        crate::tls::covers(&b.cert_pem, &b.domains).map_err(WireError::invalid)?;
        let domains = commit(st, |m| {
            m.set_cert(&b.domains, b.cert_pem.clone(), b.key_pem.clone())
        })?;
        Ok(json!({"domains": domains}))
    });
    routes = route(routes, &st, kinds::CERT_REMOVE, |st, env| {
        let b: CertRemove = body(env)?;
        commit(st, |m| m.remove_cert(&b.domains))?;
        Ok(json!({"domains": b.domains}))
    });
    routes = route(routes, &st, kinds::CERT_LIST, |st, _env| {
        let s = st.borrow();
        Ok(
            json!({"certs": s.model.certs.iter().map(|c| json!({"domains": c.domains})).collect::<Vec<_>>()}),
        )
    });
    routes = route(routes, &st, kinds::BALANCER_STATS, |_st, _env| {
        Ok(crate::admin::stats_json(&plane().shared))
    });
    {
        let st = st.clone();
        let c = ctx.clone();
        routes = routes.on(kinds::BALANCER_UPGRADE, move |_env| {
            let (st, c, fds) = (st.clone(), c.clone(), fds.clone());
            async move {
                handoff(&c, &st, fds)
                    .await
                    .map(|pid| json!({"successor_pid": pid}))
            }
        });
    }
    Ok(routes)
}

fn sd_notify_mainpid() -> std::io::Result<()> {
    if std::env::var_os("PADDOCK_TAKEOVER_WAIT_MS").is_some() {
        sd_notify::notify(
            false,
            &[sd_notify::NotifyState::MainPid(std::process::id())],
        )?;
    }
    Ok(())
}

/// Starts a successor with the listening sockets; once it serves them, this
/// process stops accepting, releases rpc and the pid lock, and drains.
async fn handoff(ctx: &Ctx, st: &Shared, fds: Vec<(String, RawFd)>) -> Result<u32, WireError> {
    if ctx.is_shutting_down() {
        // A successor now would outlive the stop that was asked for.
        return Err(WireError::new(
            Code::Conflict,
            "this balancer is stopping; start a new one instead of upgrading",
        ));
    }
    if std::mem::replace(&mut st.borrow_mut().handing_over, true) {
        return Err(WireError::new(
            Code::Conflict,
            "an upgrade is already under way",
        ));
    }
    tracing::info!("upgrade: starting a successor with the listening sockets");
    let r = tokio::task::spawn_blocking(move || {
        crate::listen::spawn_successor(&fds, Duration::from_secs(30))
    })
    .await
    .map_err(|e| WireError::internal(format!("upgrade task: {e}")))?;
    match r {
        Ok(pid) => {
            tracing::info!(
                successor = pid,
                "upgrade: the successor serves the listeners; draining this process"
            );
            // Tell systemd now, not when the successor gets the pid lock: an idle
            // predecessor may exit first, and systemd would take the unit for
            // stopped and kill the successor with it.
            if std::env::var_os("NOTIFY_SOCKET").is_some() {
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::MainPid(pid)]);
            }
            let c = ctx.clone();
            actix_rt::spawn(async move {
                // Let the reply go out first.
                tokio::time::sleep(Duration::from_millis(50)).await;
                plane().shared.shutdown.send_replace(true);
                c.stop();
            });
            Ok(pid)
        }
        Err(e) => {
            st.borrow_mut().handing_over = false;
            tracing::error!("upgrade failed: {e:#}");
            Err(WireError::internal(format!("upgrade failed: {e:#}")))
        }
    }
}

fn spawn_upgrade_signal(ctx: &Ctx, st: &Shared, fds: Vec<(String, RawFd)>) {
    let (c, st) = (ctx.clone(), st.clone());
    actix_rt::spawn(async move {
        let Ok(mut usr2) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined2())
        else {
            tracing::error!(
                "cannot install the SIGUSR2 handler; upgrades need `paddock balancer upgrade`"
            );
            return;
        };
        while usr2.recv().await.is_some() {
            tracing::info!("SIGUSR2: upgrade");
            let _ = handoff(&c, &st, fds.clone()).await;
        }
    });
}

/// Publishes `backend.drained` once a draining backend has nothing in flight, or
/// closes what is left at its drain deadline and publishes then.
fn spawn_drain_watcher(ctx: &Ctx) {
    let c = ctx.clone();
    actix_rt::spawn(async move {
        let p = plane();
        let deadline_ms = p.shared.settings.drain_timeout.as_millis() as u64;
        loop {
            tokio::time::sleep(Duration::from_millis(25)).await;
            let table = p.shared.table.load_full();
            for r in &table.routes {
                for b in &r.backends {
                    if !b.draining.load(Relaxed) || b.drained.load(Relaxed) {
                        continue;
                    }
                    let left = b.outstanding.load(Relaxed);
                    let started = b.drain_started_ms.load(Relaxed);
                    let timed_out = p.live.now_ms().saturating_sub(started) >= deadline_ms;
                    if left > 0 && !timed_out {
                        continue;
                    }
                    // After an upgrade the predecessor may still have requests
                    // in flight to it: `drained` waits until it is gone (its
                    // own drain is bounded by handoff_drain_ms).
                    if !timed_out && p.handed.predecessor_running() {
                        continue;
                    }
                    if left > 0 {
                        b.close();
                    }
                    b.pool.clear();
                    b.drained.store(true, Relaxed);
                    tracing::info!(app = %b.app, backend = %b.id, closed = left, "drained");
                    c.server().publish(
                        kinds::BACKEND_DRAINED,
                        json!({"app": &*b.app, "id": b.id, "addr": b.addr.to_string(),
                               "closed": left, "owner": r.owner.as_str()}),
                    );
                }
            }
        }
    });
}

/// Router lines: to the balancer's own log and/or PUSHed to the log sink.
fn spawn_log_shipper(ctx: &Ctx) {
    let p = plane();
    let Some(mut rx) = p.log_rx.lock().unwrap_or_else(|e| e.into_inner()).take() else {
        return;
    };
    let c = ctx.clone();
    let (to_log, to_sink) = (
        p.shared.settings.router_log,
        p.shared.settings.log_sink.is_some(),
    );
    let node = ctx.config().node().to_string();
    actix_rt::spawn(async move {
        while let Some((app, line)) = rx.recv().await {
            if to_log {
                tracing::info!(target: "router", app = %app, "{line}");
            }
            if to_sink {
                let ts = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as i64)
                    .unwrap_or(0);
                c.server().push_to(
                    "logs",
                    kinds::LOG_LINE,
                    json!({"app": &*app, "proc": "router", "instance": format!("balancer@{node}"),
                           "node": node, "ts": ts, "stream": "router", "line": line}),
                );
            }
        }
    });
}

fn apply_table(st: &Shared, from: &str, v: &Value) {
    let t: RoutesTable = match serde_json::from_value(v.clone()) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(from = ?from, "a routes.table that is not one: {e}");
            return;
        }
    };
    match commit(st, |m| m.apply_table(t.token, &t.apps)) {
        Ok(true) => {
            tracing::info!(from = ?from, token = t.token, apps = t.apps.len(), "applied the scheduler's route table")
        }
        Ok(false) => {}
        Err(e) if e.code == Code::StaleToken => {
            plane().shared.global.stale_tables.fetch_add(1, Relaxed);
            tracing::info!(from = ?from, "ignored: {}", e.message);
        }
        Err(e) => {
            tracing::warn!(from = ?from, "refused the scheduler's route table: {}", e.message)
        }
    }
}

/// Every scheduler in the registry: subscribe to its `routes.table`, and fetch
/// `routes.snapshot` when it is first seen and every `resync`, so a missed event
/// (or a reconnect) heals.
fn spawn_scheduler_sync(ctx: &Ctx, st: &Shared) {
    let (c, st) = (ctx.clone(), st.clone());
    actix_rt::spawn(async move {
        let resync = plane().shared.settings.resync;
        let mut subscribed: HashSet<String> = HashSet::new();
        let mut last_snapshot: HashMap<String, Instant> = HashMap::new();
        loop {
            if c.is_shutting_down() {
                return;
            }
            let services = c.calls().services("scheduler").await.unwrap_or_default();
            // A scheduler that was gone (suspect, dead, or the registry out of
            // reach) and is back may have published while this one could not
            // hear it: it is snapshotted again at once, as a new one is.
            last_snapshot.retain(|inc, _| services.iter().any(|s| &s.incarnation == inc));
            for svc in services {
                if let Some(pub_ep) = svc.endpoints.get("pub") {
                    if !subscribed.contains(pub_ep) {
                        match c.calls().subscribe(pub_ep, kinds::ROUTES_TABLE) {
                            Ok(mut rx) => {
                                subscribed.insert(pub_ep.clone());
                                let st = st.clone();
                                actix_rt::spawn(async move {
                                    while let Some(env) = rx.recv().await {
                                        if env.kind == kinds::ROUTES_TABLE {
                                            apply_table(&st, &env.from, &env.body);
                                        }
                                    }
                                });
                            }
                            Err(e) => tracing::warn!("cannot subscribe to {pub_ep}: {e}"),
                        }
                    }
                }
                let Some(rpc) = svc.endpoints.get("rpc") else {
                    continue;
                };
                let due = last_snapshot
                    .get(&svc.incarnation)
                    .is_none_or(|t| t.elapsed() >= resync);
                if due {
                    last_snapshot.insert(svc.incarnation.clone(), Instant::now());
                    match c
                        .calls()
                        .call(
                            rpc,
                            kinds::ROUTES_SNAPSHOT,
                            json!({}),
                            Duration::from_secs(3),
                        )
                        .await
                    {
                        Ok(v) => apply_table(&st, &format!("scheduler@{}", svc.node), &v),
                        Err(e) => {
                            // Asked again at the next tick, not a whole resync later.
                            last_snapshot.remove(&svc.incarnation);
                            tracing::debug!("routes.snapshot from {rpc}: {e}")
                        }
                    }
                }
            }
            tokio::time::sleep(resync.min(Duration::from_secs(1))).await;
        }
    });
}
