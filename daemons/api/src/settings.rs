//! `[daemons.api]`: the section as written, and its validation into [`Settings`].

use std::time::Duration;

use paddock_config::{ClusterConfig, ConfigError, Ms};
use paddock_wire::keyring::UserKeys;
use serde::Deserialize;

pub const NAME: &str = "api";

/// `[daemons.api]` as the file has it (`rpc` and `pub` are read by paddock-config).
/// An unknown key fails the start (exit 78) naming `daemons.api.KEY`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiSection {
    /// The `app.changed` PUB endpoint (bound by BaseDaemon).
    #[serde(rename = "pub")]
    pub publish: Option<String>,
    /// Hex, at least 32 bytes: every user key's secret is derived from it (HKDF).
    /// Every api of a cluster has the same one; it is as secret as the cluster key.
    pub user_key_secret: String,
    /// PostgreSQL connections per api, 1-256.
    pub pool_size: u32,
    /// How often the admitted users' CURVE keys are re-read, 100 ms to 1 min.
    pub admit_refresh_ms: Ms,
    /// How long the api waits for a balancer or runner during `app.destroy`.
    pub cleanup_timeout_ms: Ms,
}

// Never print the secret.
impl std::fmt::Debug for ApiSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiSection")
            .field("pub", &self.publish)
            .field("user_key_secret", &"***")
            .field("pool_size", &self.pool_size)
            .field("admit_refresh_ms", &self.admit_refresh_ms)
            .field("cleanup_timeout_ms", &self.cleanup_timeout_ms)
            .finish()
    }
}

impl Default for ApiSection {
    fn default() -> Self {
        ApiSection {
            publish: None,
            user_key_secret: String::new(),
            pool_size: 16,
            admit_refresh_ms: Ms::from_millis(1000),
            cleanup_timeout_ms: Ms::from_millis(3000),
        }
    }
}

/// The api's validated settings.
#[derive(Clone)]
pub struct Settings {
    pub database_url: String,
    pub pool_size: usize,
    pub admit_refresh: Duration,
    pub cleanup_timeout: Duration,
    pub user_keys: UserKeys,
    /// `[cluster] apps_domain`: every app gets `<app>.<apps_domain>`.
    pub apps_domain: Option<String>,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("pool_size", &self.pool_size)
            .field("apps_domain", &self.apps_domain)
            .finish_non_exhaustive()
    }
}

/// The api's user keys, from `[daemons.api] user_key_secret`.
pub fn user_keys(cfg: &ClusterConfig) -> Result<UserKeys, ConfigError> {
    let s: ApiSection = cfg.section(NAME)?;
    if s.user_key_secret.trim().is_empty() {
        return Err(cfg.invalid(
            &format!("daemons.{NAME}.user_key_secret"),
            "is required: 32 random bytes, hex (`paddock key generate` prints one)".into(),
        ));
    }
    UserKeys::from_hex(&s.user_key_secret)
        .map_err(|e| cfg.invalid(&format!("daemons.{NAME}.user_key_secret"), e.to_string()))
}

pub fn settings(cfg: &ClusterConfig) -> Result<Settings, ConfigError> {
    let s: ApiSection = cfg.section(NAME)?;
    let url = cfg.database_url()?;
    paddock_db::parse_url(url).map_err(|e| cfg.invalid("database.url", paddock_db::chain(&e)))?;
    if !(1..=256).contains(&s.pool_size) {
        return Err(cfg.invalid(
            &format!("daemons.{NAME}.pool_size"),
            format!("must be 1-256, not {}", s.pool_size),
        ));
    }
    let refresh = s.admit_refresh_ms.get();
    if !(Duration::from_millis(100)..=Duration::from_secs(60)).contains(&refresh) {
        return Err(cfg.invalid(
            &format!("daemons.{NAME}.admit_refresh_ms"),
            "must be 100-60000".into(),
        ));
    }
    let cleanup = s.cleanup_timeout_ms.get();
    if !(Duration::from_millis(100)..=Duration::from_secs(60)).contains(&cleanup) {
        return Err(cfg.invalid(
            &format!("daemons.{NAME}.cleanup_timeout_ms"),
            "must be 100-60000".into(),
        ));
    }
    let apps_domain = match cfg.file.cluster.apps_domain.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(d) => {
            let d = d.trim_end_matches('.').to_ascii_lowercase();
            crate::names::domain(&format!("app.{d}"), false)
                .map_err(|e| cfg.invalid("cluster.apps_domain", e.message))?;
            Some(d)
        }
    };
    Ok(Settings {
        database_url: url.to_string(),
        pool_size: s.pool_size as usize,
        admit_refresh: refresh,
        cleanup_timeout: cleanup,
        user_keys: user_keys(cfg)?,
        apps_domain,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_example_configs_have_a_valid_api_section() {
        for (p, cfg) in paddock_config::shipped_examples() {
            let s = settings(&cfg).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            assert_eq!(s.pool_size, 16, "{}", p.display());
            assert_eq!(s.apps_domain.as_deref(), Some("apps.example.com"));
        }
    }
}
