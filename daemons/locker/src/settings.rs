//! `[daemons.locker]`: the section as written, and its validation into
//! [`Settings`].

use std::time::Duration;

use paddock_config::{ClusterConfig, ConfigError, Ms};
use serde::Deserialize;

pub const NAME: &str = "locker";

/// `[daemons.locker]` as the file has it (`rpc` is read by paddock-config). An
/// unknown key fails the start (exit 78) naming `daemons.locker.KEY`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LockerSection {
    /// PostgreSQL connections per locker, 1-256.
    pub pool_size: u32,
    /// How often rows expired for over a minute are deleted, 1 s to 1 h.
    pub sweep_interval_ms: Ms,
}

impl Default for LockerSection {
    fn default() -> Self {
        LockerSection {
            pool_size: 8,
            sweep_interval_ms: Ms::from_millis(10_000),
        }
    }
}

/// The locker's validated settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub database_url: String,
    pub pool_size: usize,
    pub sweep_interval: Duration,
}

const POOL_SIZE: std::ops::RangeInclusive<u32> = 1..=256;
const SWEEP_INTERVAL: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(3600);

impl LockerSection {
    /// Checks the values and gives the settings (the database URL included).
    pub fn validate(&self, cfg: &ClusterConfig) -> Result<Settings, ConfigError> {
        let url = cfg.database_url()?;
        paddock_db::parse_url(url)
            .map_err(|e| cfg.invalid("database.url", paddock_db::chain(&e)))?;
        if !POOL_SIZE.contains(&self.pool_size) {
            return Err(cfg.invalid(
                &format!("daemons.{NAME}.pool_size"),
                format!("must be 1-256, not {}", self.pool_size),
            ));
        }
        let sweep = self.sweep_interval_ms.get();
        if !SWEEP_INTERVAL.contains(&sweep) {
            return Err(cfg.invalid(
                &format!("daemons.{NAME}.sweep_interval_ms"),
                format!(
                    "must be 1000-3600000 (1 s to 1 hour), not {}",
                    sweep.as_millis()
                ),
            ));
        }
        Ok(Settings {
            database_url: url.to_string(),
            pool_size: self.pool_size as usize,
            sweep_interval: sweep,
        })
    }
}

/// The locker's settings from the cluster file: what `Spec::check` runs before any
/// socket is bound, and what setup uses.
pub fn settings(cfg: &ClusterConfig) -> Result<Settings, ConfigError> {
    cfg.section::<LockerSection>(NAME)?.validate(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const BASE: &str = r#"
node = "a"
signing_key = "k1"
[keys]
k1 = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0"
"#;
    const DATABASE: &str =
        "[database]\nurl = \"host=127.0.0.1 port=5432 user=paddock dbname=paddock\"\n";

    fn config_with(database: &str, section: &str) -> ClusterConfig {
        let text = format!(
            "{BASE}{database}\n[daemons.locker]\nrpc = \"tcp://127.0.0.1:7102\"\n{section}"
        );
        let file = toml::from_str(&text).unwrap();
        ClusterConfig::validate(Path::new("/x/paddock.toml"), file).unwrap()
    }

    fn config(section: &str) -> ClusterConfig {
        config_with(DATABASE, section)
    }

    fn error(section: &str) -> String {
        settings(&config(section)).unwrap_err().to_string()
    }

    #[test]
    fn defaults_and_every_key() {
        let s = settings(&config("")).unwrap();
        assert_eq!(s.pool_size, 8);
        assert_eq!(s.sweep_interval, Duration::from_secs(10));
        let s = settings(&config("pool_size = 16\nsweep_interval_ms = 2500\n")).unwrap();
        assert_eq!(s.pool_size, 16);
        assert_eq!(s.sweep_interval, Duration::from_millis(2500));
        assert_eq!(
            s.database_url,
            "host=127.0.0.1 port=5432 user=paddock dbname=paddock"
        );
    }

    #[test]
    fn a_typo_names_its_key() {
        let table = [
            ("pool_sise = 8\n", "`daemons.locker.pool_sise`"),
            ("sweep_interval = 10\n", "`daemons.locker.sweep_interval`"),
            // The locker binds neither pull nor pub: such a key is a mistake.
            ("pub = \"tcp://127.0.0.1:7122\"\n", "`daemons.locker.pub`"),
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
            ("pool_size = \"lots\"\n", "`daemons.locker.pool_size`"),
            ("pool_size = -1\n", "`daemons.locker.pool_size`"),
            ("pool_size = 0\n", "`daemons.locker.pool_size`"),
            ("pool_size = 257\n", "`daemons.locker.pool_size`"),
            ("pool_size = 5000000000\n", "`daemons.locker.pool_size`"),
            (
                "sweep_interval_ms = 999\n",
                "`daemons.locker.sweep_interval_ms`",
            ),
            (
                "sweep_interval_ms = 3600001\n",
                "`daemons.locker.sweep_interval_ms`",
            ),
            (
                "sweep_interval_ms = \"often\"\n",
                "`daemons.locker.sweep_interval_ms`",
            ),
        ];
        for (section, key) in table {
            let e = error(section);
            assert!(e.contains(key), "{section}: {e}");
        }
    }

    #[test]
    fn the_database_url_is_required_and_checked() {
        let table = [
            ("", "is missing"),
            ("[database]\nurl = \" \"\n", "is missing"),
            ("[database]\nurl = \"host=x port=notaport\"\n", ""),
        ];
        for (database, why) in table {
            let e = settings(&config_with(database, ""))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("`database.url`") && e.contains(why),
                "{database}: {e}"
            );
        }
    }

    /// Every example cluster file shipped in ops/config has a locker section this
    /// daemon accepts.
    #[test]
    fn shipped_example_configs_have_a_valid_section() {
        for (p, cfg) in paddock_config::shipped_examples() {
            settings(&cfg).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        }
    }
}
