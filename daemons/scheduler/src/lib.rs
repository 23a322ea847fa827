//! paddock-scheduler: desired state (the api's apps) against actual state (the
//! runners' instances): placement, health-gated rolling deploys, auto-rollback,
//! node loss. One leads, by a locker lease whose fencing token goes with every
//! command. Work in progress (issue 10): the pure core comes first
//! (docs/design/SCHEDULER.md): `model`, `placement`, `deploy`, `reconcile`,
//! `routes`; no I/O in any of them.

pub mod deploy;
pub mod model;
pub mod placement;
pub mod reconcile;
pub mod routes;

use paddock_config::{ClusterConfig, ConfigError};
use paddock_daemon::{Ctx, Routes, Spec};
use serde::Deserialize;

pub const NAME: &str = "scheduler";

/// `[daemons.scheduler]` as the file has it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerSection {}

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
    cfg.section::<SchedulerSection>(NAME).map(|_| ())
}

pub async fn setup(_ctx: Ctx) -> anyhow::Result<Routes> {
    Ok(Routes::new())
}
