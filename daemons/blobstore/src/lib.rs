//! paddock-blobstore: content-addressed slug store (sha256), replicated to its pair.

use paddock_config::{ClusterConfig, ConfigError};
use paddock_daemon::{Ctx, Routes, Spec};
use serde::Deserialize;

pub const NAME: &str = "blobstore";

/// `[daemons.blobstore]` as the file has it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BlobstoreSection {}

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
    cfg.section::<BlobstoreSection>(NAME).map(|_| ())
}

pub async fn setup(_ctx: Ctx) -> anyhow::Result<Routes> {
    Ok(Routes::new())
}
