//! `[daemons.scheduler]`: the section as the cluster file has it, and the
//! validated settings the actor works with.

use std::time::Duration;

use paddock_config::{ClusterConfig, ConfigError, Ms};
use serde::Deserialize;

use crate::model::Policy;

/// The section as written (every key optional; a misspelt key fails the start
/// with exit 78, naming `daemons.scheduler.KEY`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerSection {
    /// The PUB endpoint for `routes.table` and `alert` (bound by the runtime).
    #[serde(rename = "pub")]
    pub publish: Option<String>,
    /// A new instance must stay up this long before an old one goes.
    pub min_healthy_ms: Ms,
    /// A new instance must be up within this of its start.
    pub healthy_deadline_ms: Ms,
    /// A rollout (and, apart, a rollback) must be done within this.
    pub progress_deadline_ms: Ms,
    /// After going live, a crash loop within this rolls back.
    pub watch_window_ms: Ms,
    /// This many restarts of a new instance during a deploy is a crash loop.
    pub crash_restarts: u32,
    /// How long a drained backend has before its stop.
    pub drain_ms: Ms,
    /// A node that came back alive gets no new work for this long.
    pub node_settle_ms: Ms,
    /// The world is re-read at least this often (and the table republished).
    pub resync_ms: Ms,
    /// The leadership lease's time to live; renewed every third of it.
    pub lease_ttl_ms: Ms,
    /// How long an `instance.start` may take (the first start of a slug on a
    /// node fetches it).
    pub start_timeout_ms: Ms,
}

impl Default for SchedulerSection {
    fn default() -> Self {
        SchedulerSection {
            publish: None,
            min_healthy_ms: Ms::from_millis(10_000),
            healthy_deadline_ms: Ms::from_millis(60_000),
            progress_deadline_ms: Ms::from_millis(300_000),
            watch_window_ms: Ms::from_millis(60_000),
            crash_restarts: 3,
            drain_ms: Ms::from_millis(30_000),
            node_settle_ms: Ms::from_millis(30_000),
            resync_ms: Ms::from_millis(5_000),
            lease_ttl_ms: Ms::from_millis(10_000),
            start_timeout_ms: Ms::from_millis(60_000),
        }
    }
}

/// The scheduler's validated settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub policy: Policy,
    pub resync: Duration,
    pub lease_ttl: Duration,
    pub start_timeout: Duration,
}

impl Settings {
    pub fn from_config(cfg: &ClusterConfig) -> Result<Settings, ConfigError> {
        let s: SchedulerSection = cfg.section(crate::NAME)?;
        Settings::validate(cfg, s)
    }

    fn validate(cfg: &ClusterConfig, s: SchedulerSection) -> Result<Settings, ConfigError> {
        let bad =
            |key: &str, why: &str| cfg.invalid(&format!("daemons.scheduler.{key}"), why.into());
        match s.publish.as_deref() {
            None => {
                return Err(bad(
                    "pub",
                    "is required: the balancers subscribe to it for routes.table",
                ))
            }
            Some(e) if !paddock_config::is_endpoint(e) => {
                return Err(bad("pub", "must be tcp://host:port or ipc://path"))
            }
            Some(_) => {}
        }
        for (key, v) in [
            ("healthy_deadline_ms", s.healthy_deadline_ms),
            ("progress_deadline_ms", s.progress_deadline_ms),
            ("drain_ms", s.drain_ms),
            ("start_timeout_ms", s.start_timeout_ms),
        ] {
            if v.get().is_zero() {
                return Err(bad(key, "must be more than 0"));
            }
        }
        if s.resync_ms.get() < Duration::from_millis(100) {
            return Err(bad("resync_ms", "must be at least 100"));
        }
        if s.lease_ttl_ms.get() < Duration::from_millis(300) {
            return Err(bad(
                "lease_ttl_ms",
                "must be at least 300 (renewed every third)",
            ));
        }
        if s.crash_restarts == 0 {
            return Err(bad("crash_restarts", "must be at least 1"));
        }
        Ok(Settings {
            policy: Policy {
                min_healthy: s.min_healthy_ms.get(),
                healthy_deadline: s.healthy_deadline_ms.get(),
                progress_deadline: s.progress_deadline_ms.get(),
                watch_window: s.watch_window_ms.get(),
                crash_restarts: s.crash_restarts,
                drain_period: s.drain_ms.get(),
                node_settle: s.node_settle_ms.get(),
            },
            resync: s.resync_ms.get(),
            lease_ttl: s.lease_ttl_ms.get(),
            start_timeout: s.start_timeout_ms.get(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(section: &str) -> ClusterConfig {
        let dir = std::env::temp_dir().join(format!(
            "paddock-scheduler-settings-{}-{}",
            std::process::id(),
            ulid_ish()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("paddock.toml");
        let text = format!(
            "node = \"n1\"\nsigning_key = \"k\"\n[keys]\nk = \"{}\"\n[daemons.scheduler]\nrpc = \"tcp://127.0.0.1:1\"\n{section}\n",
            "ab".repeat(32)
        );
        std::fs::write(&path, text).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let c = ClusterConfig::load(&path);
        std::fs::remove_dir_all(&dir).unwrap();
        c.unwrap()
    }

    fn ulid_ish() -> u128 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    }

    #[test]
    fn defaults_and_overrides() {
        let s = Settings::from_config(&cfg("pub = \"tcp://127.0.0.1:2\"")).unwrap();
        assert_eq!(s.policy.min_healthy, Duration::from_secs(10));
        assert_eq!(s.policy.healthy_deadline, Duration::from_secs(60));
        assert_eq!(s.policy.progress_deadline, Duration::from_secs(300));
        assert_eq!(s.resync, Duration::from_secs(5));
        assert_eq!(s.lease_ttl, Duration::from_secs(10));
        let s = Settings::from_config(&cfg(
            "pub = \"tcp://127.0.0.1:2\"\nmin_healthy_ms = 500\ndrain_ms = 700\nnode_settle_ms = 0",
        ))
        .unwrap();
        assert_eq!(s.policy.min_healthy, Duration::from_millis(500));
        assert_eq!(s.policy.drain_period, Duration::from_millis(700));
        assert_eq!(s.policy.node_settle, Duration::ZERO);
    }

    #[test]
    fn bad_sections_name_the_key() {
        for (section, key) in [
            ("", "daemons.scheduler.pub"),
            ("pub = \"nowhere\"", "daemons.scheduler.pub"),
            (
                "pub = \"tcp://127.0.0.1:2\"\nmin_healty_ms = 5",
                "daemons.scheduler.min_healty_ms",
            ),
            (
                "pub = \"tcp://127.0.0.1:2\"\nlease_ttl_ms = 10",
                "daemons.scheduler.lease_ttl_ms",
            ),
            (
                "pub = \"tcp://127.0.0.1:2\"\nresync_ms = 0",
                "daemons.scheduler.resync_ms",
            ),
            (
                "pub = \"tcp://127.0.0.1:2\"\ndrain_ms = 0",
                "daemons.scheduler.drain_ms",
            ),
        ] {
            let err = Settings::from_config(&cfg(section))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{section:?}: {err}");
        }
    }
}
