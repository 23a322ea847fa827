//! paddock-gitserver: `git push` over OpenSSH.

use paddock_config::{ClusterConfig, ConfigError};
use paddock_daemon::{Ctx, Routes, Spec};
use serde::Deserialize;

pub const NAME: &str = "gitserver";

/// `[daemons.gitserver]` as the file has it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GitserverSection {
    /// The URL users add as their git remote, e.g. `ssh://git@127.0.0.1:2222`.
    pub ssh: Option<String>,
    /// Where this gitserver's own sshd listens, e.g. `127.0.0.1:2222`.
    pub ssh_listen: Option<String>,
}

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
    cfg.section::<GitserverSection>(NAME).map(|_| ())
}

pub async fn setup(_ctx: Ctx) -> anyhow::Result<Routes> {
    Ok(Routes::new())
}
