//! `[daemons.blobstore]`: the section as written, and its validation into
//! [`Settings`].

use std::path::PathBuf;
use std::time::Duration;

use paddock_config::{ClusterConfig, ConfigError, Ms};
use serde::{Deserialize, Deserializer};

pub const NAME: &str = "blobstore";

/// `[daemons.blobstore]` as the file has it (`rpc` is read by paddock-config). An
/// unknown key fails the start (exit 78) naming `daemons.blobstore.KEY`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BlobstoreSection {
    /// Where blobs live; default `<state_dir>/blobstore`.
    pub dir: Option<PathBuf>,
    /// Releases per app whose blobs garbage collection keeps, 1-1000.
    #[serde(deserialize_with = "number")]
    pub keep_releases: u64,
    /// How often unreferenced blobs are collected, 1 s to 1 day.
    pub gc_interval_ms: Ms,
    /// A blob younger than this is never collected (a build in flight has put
    /// it but not released it yet), up to 30 days.
    pub gc_grace_ms: Ms,
    /// An upload with no chunk for this long is discarded, 1 s to 1 day.
    pub upload_idle_ms: Ms,
    /// How often this blobstore fetches what its peer has and it lacks, 100 ms
    /// to 1 hour.
    pub sync_interval_ms: Ms,
    /// The largest blob accepted, in bytes, 1 to 1 TiB.
    #[serde(deserialize_with = "number")]
    pub max_blob_size: u64,
}

impl Default for BlobstoreSection {
    fn default() -> Self {
        BlobstoreSection {
            dir: None,
            keep_releases: 5,
            gc_interval_ms: Ms::from_millis(600_000),
            gc_grace_ms: Ms::from_millis(3_600_000),
            upload_idle_ms: Ms::from_millis(600_000),
            sync_interval_ms: Ms::from_millis(30_000),
            max_blob_size: 2 << 30,
        }
    }
}

/// A non-negative integer, also as the string of digits an environment override
/// gives.
fn number<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        N(u64),
        S(String),
    }
    match Raw::deserialize(d) {
        Ok(Raw::N(n)) => Ok(n),
        Ok(Raw::S(s)) => s
            .trim()
            .parse()
            .map_err(|_| serde::de::Error::custom(format!("`{s}` is not a whole number"))),
        Err(_) => Err(serde::de::Error::custom(
            "must be a whole, non-negative number",
        )),
    }
}

/// The blobstore's validated settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub dir: PathBuf,
    pub keep_releases: u32,
    pub gc_interval: Duration,
    pub gc_grace: Duration,
    pub upload_idle: Duration,
    pub sync_interval: Duration,
    pub max_blob_size: u64,
    /// This blobstore's own rpc endpoint (a peer is a blobstore with another).
    pub rpc: String,
}

const DAY: u64 = 86_400_000;

impl BlobstoreSection {
    pub fn validate(&self, cfg: &ClusterConfig) -> Result<Settings, ConfigError> {
        let key = |k: &str| format!("daemons.{NAME}.{k}");
        let ms = |k: &str, v: Ms, lo: u64, hi: u64, words: &str| {
            let n = v.get().as_millis() as u64;
            if (lo..=hi).contains(&n) {
                Ok(v.get())
            } else {
                Err(cfg.invalid(&key(k), format!("must be {lo}-{hi} ({words}), not {n}")))
            }
        };
        let dir = match &self.dir {
            Some(d) if d.as_os_str().is_empty() || !d.is_absolute() => {
                return Err(cfg.invalid(
                    &key("dir"),
                    format!(
                        "must be an absolute path, not {:?}",
                        d.display().to_string()
                    ),
                ))
            }
            Some(d) => d.clone(),
            None => cfg.state_dir.join(NAME),
        };
        if !(1..=1000).contains(&self.keep_releases) {
            return Err(cfg.invalid(
                &key("keep_releases"),
                format!("must be 1-1000, not {}", self.keep_releases),
            ));
        }
        if !(1..=1u64 << 40).contains(&self.max_blob_size) {
            return Err(cfg.invalid(
                &key("max_blob_size"),
                format!(
                    "must be 1-1099511627776 bytes (1 TiB), not {}",
                    self.max_blob_size
                ),
            ));
        }
        Ok(Settings {
            dir,
            keep_releases: self.keep_releases as u32,
            gc_interval: ms(
                "gc_interval_ms",
                self.gc_interval_ms,
                1000,
                DAY,
                "1 s to 1 day",
            )?,
            gc_grace: ms(
                "gc_grace_ms",
                self.gc_grace_ms,
                0,
                30 * DAY,
                "up to 30 days",
            )?,
            upload_idle: ms(
                "upload_idle_ms",
                self.upload_idle_ms,
                1000,
                DAY,
                "1 s to 1 day",
            )?,
            sync_interval: ms(
                "sync_interval_ms",
                self.sync_interval_ms,
                100,
                3_600_000,
                "100 ms to 1 hour",
            )?,
            max_blob_size: self.max_blob_size,
            rpc: cfg.daemon(NAME)?.rpc.clone(),
        })
    }
}

/// The blobstore's settings from the cluster file: what `Spec::check` runs before
/// any socket is bound, and what setup uses.
pub fn settings(cfg: &ClusterConfig) -> Result<Settings, ConfigError> {
    cfg.section::<BlobstoreSection>(NAME)?.validate(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const BASE: &str = r#"
node = "a"
signing_key = "k1"
state_dir = "/var/lib/paddock"
[keys]
k1 = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0"
"#;

    fn config(section: &str) -> ClusterConfig {
        let text =
            format!("{BASE}\n[daemons.blobstore]\nrpc = \"tcp://127.0.0.1:7106\"\n{section}");
        let file = toml::from_str(&text).unwrap();
        ClusterConfig::validate(Path::new("/x/paddock.toml"), file).unwrap()
    }

    fn error(section: &str) -> String {
        settings(&config(section)).unwrap_err().to_string()
    }

    #[test]
    fn defaults_and_every_key() {
        let s = settings(&config("")).unwrap();
        assert_eq!(s.dir, Path::new("/var/lib/paddock/blobstore"));
        assert_eq!(s.keep_releases, 5);
        assert_eq!(s.gc_interval, Duration::from_secs(600));
        assert_eq!(s.gc_grace, Duration::from_secs(3600));
        assert_eq!(s.upload_idle, Duration::from_secs(600));
        assert_eq!(s.sync_interval, Duration::from_secs(30));
        assert_eq!(s.max_blob_size, 2 << 30);
        assert_eq!(s.rpc, "tcp://127.0.0.1:7106");
        let s = settings(&config(
            "dir = \"/srv/blobs\"\nkeep_releases = 2\ngc_interval_ms = 1000\ngc_grace_ms = 0\nupload_idle_ms = 5000\nsync_interval_ms = 100\nmax_blob_size = 1024\n",
        ))
        .unwrap();
        assert_eq!(s.dir, Path::new("/srv/blobs"));
        assert_eq!(s.keep_releases, 2);
        assert_eq!(s.gc_interval, Duration::from_secs(1));
        assert_eq!(s.gc_grace, Duration::ZERO);
        assert_eq!(s.upload_idle, Duration::from_secs(5));
        assert_eq!(s.sync_interval, Duration::from_millis(100));
        assert_eq!(s.max_blob_size, 1024);
        // Environment overrides arrive as strings.
        let s = settings(&config("keep_releases = \"7\"\nmax_blob_size = \"99\"\n")).unwrap();
        assert_eq!((s.keep_releases, s.max_blob_size), (7, 99));
    }

    #[test]
    fn a_typo_or_a_wrong_value_names_its_key() {
        let table = [
            ("keep_release = 3\n", "`daemons.blobstore.keep_release`"),
            ("pub = \"tcp://127.0.0.1:1\"\n", "`daemons.blobstore.pub`"),
            ("keep_releases = 0\n", "`daemons.blobstore.keep_releases`"),
            (
                "keep_releases = 1001\n",
                "`daemons.blobstore.keep_releases`",
            ),
            ("keep_releases = -1\n", "`daemons.blobstore.keep_releases`"),
            (
                "keep_releases = \"few\"\n",
                "`daemons.blobstore.keep_releases`",
            ),
            ("dir = \"relative/blobs\"\n", "`daemons.blobstore.dir`"),
            ("dir = \"\"\n", "`daemons.blobstore.dir`"),
            (
                "gc_interval_ms = 999\n",
                "`daemons.blobstore.gc_interval_ms`",
            ),
            (
                "gc_grace_ms = 2592000001\n",
                "`daemons.blobstore.gc_grace_ms`",
            ),
            ("upload_idle_ms = 0\n", "`daemons.blobstore.upload_idle_ms`"),
            (
                "sync_interval_ms = 99\n",
                "`daemons.blobstore.sync_interval_ms`",
            ),
            ("max_blob_size = 0\n", "`daemons.blobstore.max_blob_size`"),
            (
                "max_blob_size = 1099511627777\n",
                "`daemons.blobstore.max_blob_size`",
            ),
        ];
        for (section, key) in table {
            let e = error(section);
            assert!(e.contains(key), "{section}: {e}");
        }
    }

    /// Every example cluster file shipped in ops/config has a blobstore section
    /// this daemon accepts (or none, where the defaults apply).
    #[test]
    fn shipped_example_configs_have_a_valid_section() {
        for (p, cfg) in paddock_config::shipped_examples() {
            if cfg.daemon(NAME).is_ok() {
                settings(&cfg).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            }
        }
    }
}
