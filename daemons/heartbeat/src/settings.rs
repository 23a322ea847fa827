//! `[daemons.heartbeat]`: the section as written, and its validation into the
//! registry's [`Thresholds`].

use paddock_config::{is_endpoint, ClusterConfig, ConfigError, Ms};
use serde::Deserialize;

use crate::registry::Thresholds;

pub const NAME: &str = "heartbeat";

/// `[daemons.heartbeat]` as the file has it (`rpc` is read by paddock-config). An
/// unknown key fails the start (exit 78) naming `daemons.heartbeat.KEY`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HeartbeatSection {
    /// The PULL endpoint beats arrive on (bound by paddock-daemon).
    pub pull: Option<String>,
    /// The PUB endpoint `registry.up` / `registry.down` go out on.
    #[serde(rename = "pub")]
    pub publish: Option<String>,
    /// Missed intervals (of each sender's own interval) before `suspect`.
    pub suspect_after: u32,
    /// Missed intervals before `dead`; more than `suspect_after`.
    pub dead_after: u32,
    /// How long a dead entry stays listed after its last beat.
    pub forget_after_ms: Ms,
}

impl Default for HeartbeatSection {
    fn default() -> Self {
        let t = Thresholds::default();
        HeartbeatSection {
            pull: None,
            publish: None,
            suspect_after: t.suspect_after,
            dead_after: t.dead_after,
            forget_after_ms: Ms(t.forget_after),
        }
    }
}

impl HeartbeatSection {
    /// Reads `[daemons.heartbeat]` from the cluster file.
    pub fn read(cfg: &ClusterConfig) -> Result<HeartbeatSection, ConfigError> {
        cfg.section(NAME)
    }

    /// Checks the values together and gives the registry's thresholds.
    pub fn validate(&self, cfg: &ClusterConfig) -> Result<Thresholds, ConfigError> {
        for (key, v) in [("pull", &self.pull), ("pub", &self.publish)] {
            if let Some(ep) = v {
                if !is_endpoint(ep) {
                    return Err(cfg.invalid(
                        &format!("daemons.{NAME}.{key}"),
                        format!("`{ep}` is not an endpoint (tcp://host:port or ipc://path)"),
                    ));
                }
            }
        }
        if self.suspect_after == 0 {
            return Err(cfg.invalid(
                &format!("daemons.{NAME}.suspect_after"),
                "must be at least 1".into(),
            ));
        }
        if self.dead_after <= self.suspect_after {
            return Err(cfg.invalid(
                &format!("daemons.{NAME}.dead_after"),
                format!(
                    "must exceed suspect_after ({}), not {}",
                    self.suspect_after, self.dead_after
                ),
            ));
        }
        Ok(Thresholds {
            suspect_after: self.suspect_after,
            dead_after: self.dead_after,
            forget_after: self.forget_after_ms.get(),
        })
    }
}

/// The registry's thresholds from the cluster file: what `Spec::check` runs before
/// any socket is bound, and what a SIGHUP reload re-reads.
pub fn thresholds(cfg: &ClusterConfig) -> Result<Thresholds, ConfigError> {
    HeartbeatSection::read(cfg)?.validate(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::time::Duration;

    const BASE: &str = r#"
node = "a"
signing_key = "k1"
[keys]
k1 = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0"
"#;

    fn config(section: &str) -> ClusterConfig {
        let text =
            format!("{BASE}\n[daemons.heartbeat]\nrpc = \"tcp://127.0.0.1:7101\"\n{section}");
        let file = toml::from_str(&text).unwrap();
        ClusterConfig::validate(Path::new("/x/paddock.toml"), file).unwrap()
    }

    fn error(section: &str) -> String {
        thresholds(&config(section)).unwrap_err().to_string()
    }

    #[test]
    fn defaults_and_every_key() {
        assert_eq!(thresholds(&config("")).unwrap(), Thresholds::default());
        let t = thresholds(&config(
            "pull = \"tcp://127.0.0.1:7111\"\npub = \"tcp://127.0.0.1:7121\"\n\
             suspect_after = 4\ndead_after = 9\nforget_after_ms = 1500\n",
        ))
        .unwrap();
        assert_eq!(
            t,
            Thresholds {
                suspect_after: 4,
                dead_after: 9,
                forget_after: Duration::from_millis(1500),
            }
        );
    }

    #[test]
    fn a_typo_names_its_key() {
        let table = [
            ("suspect_afer = 2\n", "`daemons.heartbeat.suspect_afer`"),
            ("forget_after = 10\n", "`daemons.heartbeat.forget_after`"),
            (
                "publish = \"tcp://127.0.0.1:1\"\n",
                "`daemons.heartbeat.publish`",
            ),
            ("pool_size = 8\n", "`daemons.heartbeat.pool_size`"),
        ];
        for (section, key) in table {
            let e = error(section);
            assert!(
                e.contains(key) && e.contains("unknown field"),
                "{section}: {e}"
            );
        }
    }

    #[test]
    fn a_wrong_type_or_value_names_its_key() {
        let table = [
            (
                "suspect_after = \"two\"\n",
                "`daemons.heartbeat.suspect_after`",
            ),
            ("suspect_after = -1\n", "`daemons.heartbeat.suspect_after`"),
            (
                "dead_after = 5000000000\n",
                "`daemons.heartbeat.dead_after`",
            ),
            (
                "forget_after_ms = \"soon\"\n",
                "`daemons.heartbeat.forget_after_ms`",
            ),
            (
                "forget_after_ms = -5\n",
                "`daemons.heartbeat.forget_after_ms`",
            ),
            ("suspect_after = 0\n", "`daemons.heartbeat.suspect_after`"),
            (
                "suspect_after = 3\ndead_after = 3\n",
                "`daemons.heartbeat.dead_after`",
            ),
            ("pull = \"127.0.0.1:7111\"\n", "`daemons.heartbeat.pull`"),
            ("pub = 7121\n", "`daemons.heartbeat.pub`"),
        ];
        for (section, key) in table {
            let e = error(section);
            assert!(e.contains(key), "{section}: {e}");
        }
    }

    /// Every example cluster file shipped in ops/config has a heartbeat section this
    /// daemon accepts.
    #[test]
    fn shipped_example_configs_have_a_valid_section() {
        for (p, cfg) in paddock_config::shipped_examples() {
            thresholds(&cfg).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        }
    }
}
