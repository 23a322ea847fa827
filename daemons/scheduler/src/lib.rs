//! paddock-scheduler: desired state (the api's apps) against actual state (the
//! runners' instances): placement, health-gated rolling deploys, auto-rollback,
//! node loss. One leads, by a locker lease whose fencing token goes with every
//! command. The decisions are a pure core (docs/design/SCHEDULER.md): `model`,
//! `placement`, `deploy`, `reconcile`, `routes`, with no I/O in any of them;
//! `actor` is the loop that feeds it and carries out what it decides.

pub mod actor;
pub mod deploy;
pub mod model;
pub mod placement;
pub mod reconcile;
pub mod routes;
pub mod settings;

use std::cell::RefCell;
use std::rc::Rc;

use paddock_config::{ClusterConfig, ConfigError};
use paddock_daemon::{Ctx, LoopKind, Routes, Spec};
use paddock_wire::WireError;
use serde_json::{json, Value};

pub use settings::{SchedulerSection, Settings};

pub const NAME: &str = "scheduler";

pub fn spec() -> Spec {
    Spec {
        name: NAME,
        version: env!("CARGO_PKG_VERSION"),
        pull: false,
        publish: true,
        user_keys: None,
        check,
        push_to: paddock_daemon::no_push_to,
    }
}

fn check(cfg: &ClusterConfig) -> Result<(), ConfigError> {
    Settings::from_config(cfg).map(|_| ())
}

pub async fn setup(ctx: Ctx) -> anyhow::Result<Routes> {
    let settings = Settings::from_config(&ctx.config())?;
    let shared = Rc::new(RefCell::new(actor::Shared::default()));
    {
        let (ctx2, shared, settings) = (ctx.clone(), shared.clone(), settings.clone());
        ctx.spawn_loop("schedule", LoopKind::Critical, move || {
            let me = actor::Scheduler::new(ctx2.clone(), settings.clone(), shared.clone());
            me.run()
        });
    }
    let snap = shared.clone();
    let (check_shared, restart_shared) = (shared.clone(), shared.clone());
    let policy = settings.policy.clone();
    Ok(Routes::new()
        .on("formation.check", move |env| {
            let shared = check_shared.clone();
            let policy = policy.clone();
            async move { formation_check(&shared.borrow(), &policy, &env.body) }
        })
        .on("app.restart", move |env| {
            let shared = restart_shared.clone();
            async move { app_restart(&mut shared.borrow_mut(), &env.body) }
        })
        .on("routes.snapshot", move |_env| {
            let shared = snap.clone();
            async move {
                let sh = shared.borrow();
                match (sh.token, &sh.table) {
                    (Some(_), Some(t)) => Ok(t.clone()),
                    _ => Err(WireError::unavailable(
                        "this scheduler does not lead (or has not yet read the cluster): ask the leader",
                    )),
                }
            }
        })
        .on("scheduler.status", move |_env| {
            let shared = shared.clone();
            async move {
                let sh = shared.borrow();
                Ok(json!({"leader": sh.token.is_some(), "token": sh.token, "deploys": sh.deploys}))
            }
        }))
}

fn not_leader() -> WireError {
    WireError::unavailable(
        "this scheduler does not lead (or has not yet read the cluster): ask the leader",
    )
}

fn app_name(body: &Value) -> Result<&str, WireError> {
    body["app"]
        .as_str()
        .filter(|a| !a.is_empty() && a.len() <= 64)
        .ok_or_else(|| WireError::invalid("`app` must be an app's name"))
}

/// `formation.check`: whether the app's whole new formation could be placed on
/// the runners as the last pass saw them; "N of M placed" when not.
fn formation_check(
    sh: &actor::Shared,
    policy: &model::Policy,
    body: &Value,
) -> Result<Value, WireError> {
    let (Some(_), Some((registry, instances, _))) = (sh.token, &sh.world) else {
        return Err(not_leader());
    };
    let app = app_name(body)?;
    let items = body["formation"].as_array().ok_or_else(|| {
        WireError::invalid("`formation` must be a list of {type, quantity, memory_mb}")
    })?;
    let mut formation = model::Formation::new();
    for f in items {
        let (Some(proc), Some(quantity), Some(memory_mb)) = (
            f["type"].as_str(),
            f["quantity"].as_u64().and_then(|q| u32::try_from(q).ok()),
            f["memory_mb"].as_u64(),
        ) else {
            return Err(WireError::invalid(
                "each `formation` item needs `type`, `quantity` and `memory_mb`",
            ));
        };
        formation.insert(
            proc.to_string(),
            model::Scale {
                quantity,
                memory_mb,
            },
        );
    }
    let mut running: std::collections::BTreeMap<String, u32> = Default::default();
    for i in instances {
        let dead = registry
            .get(&i.node)
            .is_none_or(|n| n.liveness == model::Liveness::Dead);
        let same = formation
            .get(&i.proc)
            .is_some_and(|s| s.memory_mb == i.memory_mb);
        if i.app == app && i.owner == model::Owner::Scheduler && !i.state.is_gone() && !dead && same
        {
            *running.entry(i.proc.clone()).or_insert(0) += 1;
        }
    }
    let room = placement::Room::new(registry, instances, std::time::Instant::now(), policy);
    match placement::check_formation(&room, app, &formation, &running) {
        // Not `ok`: the wire sets a reply's `ok` on every answer.
        Ok(()) => Ok(json!({"placeable": true})),
        Err(s) => Ok(
            json!({"placeable": false, "type": s.proc, "placed": s.placed,
                            "wanted": s.wanted, "message": s.to_string()}),
        ),
    }
}

/// `app.restart`: a rolling restart of the app's current release (one process
/// type's instances, or all), begun by the next pass.
fn app_restart(sh: &mut actor::Shared, body: &Value) -> Result<Value, WireError> {
    if sh.token.is_none() || sh.world.is_none() {
        return Err(not_leader());
    }
    let app = app_name(body)?.to_string();
    let only = match &body["type"] {
        Value::Null => None,
        Value::String(t) => Some(t.clone()),
        _ => return Err(WireError::invalid("`type` must be a process type's name")),
    };
    let Some((version, types)) = sh.current.get(&app).cloned() else {
        return Err(WireError::new(
            paddock_wire::Code::NotFound,
            format!("{app} has no release running: nothing to restart"),
        ));
    };
    if let Some(t) = &only {
        if !types.contains(t) {
            return Err(WireError::new(
                paddock_wire::Code::NotFound,
                format!(
                    "{app} has no `{t}` processes in its formation (it has: {})",
                    types.join(", ")
                ),
            ));
        }
    }
    if let Some(d) = sh.deploys.iter().find(|d| d["app"] == app.as_str()) {
        return Err(WireError::new(
            paddock_wire::Code::Conflict,
            format!(
                "a deploy of v{} is under way for {app}: restart when it has ended",
                d["version"]
            ),
        ));
    }
    // Two restarts of one app before a pass: of two types, or of one and of
    // all, is a restart of all.
    match sh.restarts.iter_mut().find(|(a, _)| a == &app) {
        Some((_, t)) if *t != only => *t = None,
        Some(_) => {}
        None => sh.restarts.push((app.clone(), only.clone())),
    }
    sh.wake.notify_one();
    Ok(json!({"app": app, "version": version, "type": only}))
}
