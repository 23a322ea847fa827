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
use serde_json::json;

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
        let (ctx2, shared) = (ctx.clone(), shared.clone());
        ctx.spawn_loop("schedule", LoopKind::Critical, move || {
            let me = actor::Scheduler::new(ctx2.clone(), settings.clone(), shared.clone());
            me.run()
        });
    }
    let snap = shared.clone();
    Ok(Routes::new()
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
