//! paddock-deployer: builds pushed commits with buildpacks into slugs and releases.

use paddock_config::{ClusterConfig, ConfigError};
use paddock_daemon::{Ctx, Routes, Spec};
use serde::Deserialize;

pub const NAME: &str = "deployer";

/// `[daemons.deployer]` as the file has it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeployerSection {}

pub fn spec() -> Spec {
    Spec {
        name: NAME,
        version: env!("CARGO_PKG_VERSION"),
        pull: false,
        publish: false,
        user_keys: None,
        check,
        push_to: paddock_daemon::no_push_to,
    }
}

fn check(cfg: &ClusterConfig) -> Result<(), ConfigError> {
    cfg.section::<DeployerSection>(NAME).map(|_| ())
}

pub async fn setup(_ctx: Ctx) -> anyhow::Result<Routes> {
    Ok(Routes::new())
}
