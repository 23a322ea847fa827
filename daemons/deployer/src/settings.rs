//! `[daemons.deployer]`: the section as written, and its validation into
//! [`Settings`].

use std::path::PathBuf;
use std::time::Duration;

use paddock_config::{ClusterConfig, ConfigError, Ms};
use serde::Deserialize;

pub const NAME: &str = "deployer";

/// `[daemons.deployer]` as the file has it (`rpc` is read by paddock-config). An
/// unknown key fails the start (exit 78) naming `daemons.deployer.KEY`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeployerSection {
    /// Builds, per-app caches and the installed buildpacks. Default
    /// `<state_dir>/deployer`.
    pub dir: Option<PathBuf>,
    /// A whole build's time limit (fetch to release phase), 10 s to 2 h.
    pub build_timeout_ms: Ms,
    /// The build's cgroup memory limit, 64 MiB to 64 GiB.
    pub build_memory_mb: u64,
    /// The build's cgroup pids limit, 16 to 65536.
    pub build_pids: u64,
    /// Relative CPU weight of builds, 1-10000 (100 is an instance's default).
    pub build_cpu_weight: u64,
    /// Finished builds kept per app (their records and logs), 1-10000.
    pub keep_builds: u32,
    /// PostgreSQL connections, 1-64.
    pub pool_size: u32,
    /// The cgroup filesystem root.
    pub cgroup_root: PathBuf,
    /// How long the release phase (`release:` process type) may run, 1 s to 1 h.
    pub release_timeout_ms: Ms,
    /// Builds this deployer runs at once, 1-64; more wait for a slot.
    pub max_builds: u32,
    /// Directories under which an app may name a local buildpack (an absolute
    /// path in `.buildpacks` or `BUILDPACK_URL`); empty (the default) refuses
    /// local paths. Every directory of a buildpack's resolved path must be
    /// root's and writable by no one else (or sticky, like /tmp). A string is
    /// a `:`-separated list, so `PADDOCK__DAEMONS__DEPLOYER__LOCAL_BUILDPACKS`
    /// can set it.
    #[serde(deserialize_with = "paths")]
    pub local_buildpacks: Vec<PathBuf>,
    /// The largest file build code may write (RLIMIT_FSIZE), and the largest
    /// uncompressed slug, in MiB, 64 to 1048576.
    pub build_disk_mb: u64,
    /// The largest compressed slug, in MiB, 1 to 65536.
    pub max_slug_mb: u64,
    /// Files and directories a build may have in its trees (`/app`,
    /// `/tmp/work` and the app's cache together), 1000 to 100000000.
    pub build_inodes: u64,
    /// An app's build cache larger than this (MiB, 1 to 1048576) at the end of
    /// a build is dropped.
    pub cache_mb: u64,
    /// Build without memory and pids cgroups (they are missing on the host):
    /// off by default, when such builds are refused.
    pub allow_unconfined_builds: bool,
}

/// A list of paths, or one string of `:`-separated paths (an env override).
fn paths<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<PathBuf>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Paths {
        One(String),
        Many(Vec<PathBuf>),
    }
    Ok(match Paths::deserialize(d)? {
        Paths::One(s) => s
            .split(':')
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
            .collect(),
        Paths::Many(v) => v,
    })
}

impl Default for DeployerSection {
    fn default() -> Self {
        DeployerSection {
            dir: None,
            build_timeout_ms: Ms::from_millis(900_000),
            build_memory_mb: 1024,
            build_pids: 512,
            build_cpu_weight: 100,
            keep_builds: 100,
            pool_size: 4,
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
            release_timeout_ms: Ms::from_millis(600_000),
            max_builds: 4,
            local_buildpacks: Vec::new(),
            build_disk_mb: 4096,
            max_slug_mb: 1024,
            build_inodes: 200_000,
            cache_mb: 2048,
            allow_unconfined_builds: false,
        }
    }
}

/// The deployer's validated settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub database_url: String,
    pub dir: PathBuf,
    pub build_timeout: Duration,
    pub build_memory_mb: u64,
    pub build_pids: u64,
    pub build_cpu_weight: u64,
    pub keep_builds: u32,
    pub pool_size: usize,
    pub cgroup_root: PathBuf,
    pub release_timeout: Duration,
    pub max_builds: usize,
    pub local_buildpacks: Vec<PathBuf>,
    pub build_disk_mb: u64,
    pub max_slug_mb: u64,
    pub build_inodes: u64,
    pub cache_mb: u64,
    pub allow_unconfined_builds: bool,
    pub node: String,
    /// The cluster has a scheduler (a `[daemons.scheduler]` section): a release
    /// is left pending for it to roll out and mark; else the deployer marks it
    /// succeeded, and so current, itself.
    pub scheduled: bool,
}

impl DeployerSection {
    pub fn validate(&self, cfg: &ClusterConfig) -> Result<Settings, ConfigError> {
        let url = cfg.database_url()?;
        paddock_db::parse_url(url)
            .map_err(|e| cfg.invalid("database.url", paddock_db::chain(&e)))?;
        let range = |key: &str, v: u64, lo: u64, hi: u64| {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(cfg.invalid(
                    &format!("daemons.{NAME}.{key}"),
                    format!("must be {lo}-{hi}, not {v}"),
                ))
            }
        };
        let timeout = self.build_timeout_ms.get();
        range(
            "build_timeout_ms",
            timeout.as_millis() as u64,
            10_000,
            7_200_000,
        )?;
        let release_timeout = self.release_timeout_ms.get();
        range(
            "release_timeout_ms",
            release_timeout.as_millis() as u64,
            1_000,
            3_600_000,
        )?;
        range("build_memory_mb", self.build_memory_mb, 64, 65_536)?;
        range("build_pids", self.build_pids, 16, 65_536)?;
        range("build_cpu_weight", self.build_cpu_weight, 1, 10_000)?;
        range("keep_builds", self.keep_builds as u64, 1, 10_000)?;
        range("pool_size", self.pool_size as u64, 1, 64)?;
        range("max_builds", self.max_builds as u64, 1, 64)?;
        range("build_disk_mb", self.build_disk_mb, 64, 1 << 20)?;
        range("max_slug_mb", self.max_slug_mb, 1, 65_536)?;
        range("build_inodes", self.build_inodes, 1000, 100_000_000)?;
        range("cache_mb", self.cache_mb, 1, 1 << 20)?;
        for p in &self.local_buildpacks {
            if !p.is_absolute() || p.parent().is_none() {
                return Err(cfg.invalid(
                    &format!("daemons.{NAME}.local_buildpacks"),
                    format!(
                        "must list absolute directories other than /, not {}",
                        p.display()
                    ),
                ));
            }
        }
        let dir = self.dir.clone().unwrap_or_else(|| cfg.state_dir.join(NAME));
        if !dir.is_absolute() {
            return Err(cfg.invalid(
                &format!("daemons.{NAME}.dir"),
                format!("must be an absolute path, not {}", dir.display()),
            ));
        }
        Ok(Settings {
            database_url: url.to_string(),
            dir,
            build_timeout: timeout,
            build_memory_mb: self.build_memory_mb,
            build_pids: self.build_pids,
            build_cpu_weight: self.build_cpu_weight,
            keep_builds: self.keep_builds,
            pool_size: self.pool_size as usize,
            cgroup_root: self.cgroup_root.clone(),
            release_timeout,
            max_builds: self.max_builds as usize,
            local_buildpacks: self.local_buildpacks.clone(),
            build_disk_mb: self.build_disk_mb,
            max_slug_mb: self.max_slug_mb,
            build_inodes: self.build_inodes,
            cache_mb: self.cache_mb,
            allow_unconfined_builds: self.allow_unconfined_builds,
            node: cfg.node().to_string(),
            scheduled: cfg.file.daemons.contains_key("scheduler"),
        })
    }
}

/// The deployer's settings from the cluster file: what `Spec::check` runs before
/// any socket is bound, and what setup uses.
pub fn settings(cfg: &ClusterConfig) -> Result<Settings, ConfigError> {
    cfg.section::<DeployerSection>(NAME)?.validate(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config(section: &str) -> ClusterConfig {
        let text = format!(
            r#"
node = "a"
signing_key = "k1"
state_dir = "/var/lib/paddock"
[keys]
k1 = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0"
[database]
url = "host=127.0.0.1 port=5432 user=paddock dbname=paddock"
[daemons.deployer]
rpc = "tcp://127.0.0.1:7110"
{section}"#
        );
        let file = toml::from_str(&text).unwrap();
        ClusterConfig::validate(Path::new("/x/paddock.toml"), file).unwrap()
    }

    fn error(section: &str) -> String {
        settings(&config(section)).unwrap_err().to_string()
    }

    #[test]
    fn defaults_and_every_key() {
        let s = settings(&config("")).unwrap();
        assert_eq!(s.dir, PathBuf::from("/var/lib/paddock/deployer"));
        assert_eq!(s.build_timeout, Duration::from_secs(900));
        assert_eq!(
            (s.build_memory_mb, s.build_pids, s.build_cpu_weight),
            (1024, 512, 100)
        );
        assert_eq!((s.keep_builds, s.pool_size), (100, 4));
        assert_eq!(s.release_timeout, Duration::from_secs(600));
        assert_eq!(s.max_builds, 4);
        assert!(
            s.local_buildpacks.is_empty(),
            "local buildpacks are refused"
        );
        assert_eq!((s.build_disk_mb, s.max_slug_mb), (4096, 1024));
        assert_eq!((s.build_inodes, s.cache_mb), (200_000, 2048));
        assert!(!s.allow_unconfined_builds);
        let s = settings(&config(
            "dir = \"/srv/builds\"\nbuild_timeout_ms = 60000\nbuild_memory_mb = 256\n\
             build_pids = 64\nbuild_cpu_weight = 50\nkeep_builds = 5\npool_size = 2\n\
             cgroup_root = \"/cg\"\nrelease_timeout_ms = 5000\nmax_builds = 1\n\
             local_buildpacks = [\"/srv/buildpacks\"]\nbuild_disk_mb = 128\nmax_slug_mb = 2\n\
             allow_unconfined_builds = true\nbuild_inodes = 5000\ncache_mb = 10\n",
        ))
        .unwrap();
        assert_eq!(s.dir, PathBuf::from("/srv/builds"));
        assert_eq!(s.build_timeout, Duration::from_secs(60));
        assert_eq!(
            (s.build_memory_mb, s.build_pids, s.build_cpu_weight),
            (256, 64, 50)
        );
        assert_eq!((s.keep_builds, s.pool_size), (5, 2));
        assert_eq!(s.cgroup_root, PathBuf::from("/cg"));
        assert_eq!(s.release_timeout, Duration::from_secs(5));
        assert_eq!(s.max_builds, 1);
        assert_eq!(s.local_buildpacks, [PathBuf::from("/srv/buildpacks")]);
        assert_eq!((s.build_disk_mb, s.max_slug_mb), (128, 2));
        assert_eq!((s.build_inodes, s.cache_mb), (5000, 10));
        assert!(s.allow_unconfined_builds);
        let s = settings(&config("local_buildpacks = \"/var/tmp:/srv/bp\"\n")).unwrap();
        assert_eq!(
            s.local_buildpacks,
            [PathBuf::from("/var/tmp"), PathBuf::from("/srv/bp")]
        );
    }

    #[test]
    fn bad_values_name_their_key() {
        for (section, key) in [
            (
                "build_timeout_ms = 5\n",
                "daemons.deployer.build_timeout_ms",
            ),
            ("build_memory_mb = 1\n", "daemons.deployer.build_memory_mb"),
            ("build_pids = 0\n", "daemons.deployer.build_pids"),
            (
                "build_cpu_weight = 0\n",
                "daemons.deployer.build_cpu_weight",
            ),
            ("keep_builds = 0\n", "daemons.deployer.keep_builds"),
            ("max_builds = 0\n", "daemons.deployer.max_builds"),
            ("dir = \"relative\"\n", "daemons.deployer.dir"),
            (
                "local_buildpacks = [\"srv\"]\n",
                "daemons.deployer.local_buildpacks",
            ),
            (
                "local_buildpacks = [\"/\"]\n",
                "daemons.deployer.local_buildpacks",
            ),
            ("build_disk_mb = 1\n", "daemons.deployer.build_disk_mb"),
            ("max_slug_mb = 0\n", "daemons.deployer.max_slug_mb"),
            ("build_inodes = 10\n", "daemons.deployer.build_inodes"),
            ("cache_mb = 0\n", "daemons.deployer.cache_mb"),
            ("build_timeout = 5\n", "daemons.deployer.build_timeout"),
        ] {
            let e = error(section);
            assert!(e.contains(key), "{section}: {e}");
        }
    }
}
