//! `[daemons.runner]`: the typed section as written in the cluster file, and the
//! validated settings the runner works with.

use std::path::PathBuf;
use std::time::Duration;

use paddock_config::{ClusterConfig, ConfigError, Ms};
use serde::Deserialize;

/// The section as written (every key optional; a misspelt key fails the start with
/// exit 78, naming `daemons.runner.KEY`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RunnerSection {
    /// The PUB endpoint for `instance.*` events (bound by the daemon runtime).
    #[serde(rename = "pub")]
    pub publish: Option<String>,
    /// Where log lines are PUSHed (a logger's pull endpoint).
    pub log_sink: Option<String>,
    pub port_min: u16,
    pub port_max: u16,
    /// Root of the per-instance home and tmp directories (must be searchable by
    /// app users). Default: `<state dir>/apps`.
    pub apps_dir: Option<PathBuf>,
    /// Instance records, logs and shim sockets. Default: `<state dir>/runner`.
    pub instances_dir: Option<PathBuf>,
    pub cgroup_root: PathBuf,
    pub stop_grace_ms: Ms,
    pub start_timeout_ms: Ms,
    pub health_interval_ms: Ms,
    pub health_failures: u32,
    pub none_up_after_ms: Ms,
    pub restart_limit: u32,
    pub restart_window_ms: Ms,
    pub backoff_base_ms: Ms,
    pub backoff_cap_ms: Ms,
    pub backoff_reset_ms: Ms,
    pub log_max_bytes: u64,
    pub nofile: u64,
    pub pids: u64,
    /// 0: no memory limit by default.
    pub memory_mb: u64,
    /// How long a stopped instance's directories (record, logs, home) are kept.
    pub stopped_keep_ms: Ms,
    /// The IP address others reach this node's instances at (`addr` in
    /// `instance.list`). Default 127.0.0.1.
    pub advertise: Option<String>,
    /// The memory this runner offers to instances (`runner.info`). Default: 80%
    /// of the node's MemTotal.
    pub offer_memory_mb: Option<u64>,
}

impl Default for RunnerSection {
    fn default() -> Self {
        RunnerSection {
            publish: None,
            log_sink: None,
            port_min: 20_000,
            port_max: 29_999,
            apps_dir: None,
            instances_dir: None,
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
            stop_grace_ms: Ms::from_millis(10_000),
            start_timeout_ms: Ms::from_millis(30_000),
            health_interval_ms: Ms::from_millis(5_000),
            health_failures: 3,
            none_up_after_ms: Ms::from_millis(2_000),
            restart_limit: 10,
            restart_window_ms: Ms::from_millis(60_000),
            backoff_base_ms: Ms::from_millis(100),
            backoff_cap_ms: Ms::from_millis(30_000),
            backoff_reset_ms: Ms::from_millis(30_000),
            log_max_bytes: 1 << 20,
            nofile: 4096,
            pids: 512,
            memory_mb: 0,
            stopped_keep_ms: Ms::from_millis(3_600_000),
            advertise: None,
            offer_memory_mb: None,
        }
    }
}

/// The runner's validated settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub log_sink: Option<String>,
    pub port_min: u16,
    pub port_max: u16,
    pub apps_dir: PathBuf,
    pub instances_dir: PathBuf,
    pub cgroup_root: PathBuf,
    pub stop_grace: Duration,
    pub start_timeout: Duration,
    pub health_interval: Duration,
    pub health_failures: u32,
    pub none_up_after: Duration,
    pub restart_limit: u32,
    pub restart_window: Duration,
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    pub backoff_reset: Duration,
    pub log_max_bytes: u64,
    pub nofile: u64,
    pub pids: u64,
    pub memory_mb: Option<u64>,
    pub stopped_keep: Duration,
    pub advertise: std::net::IpAddr,
    pub offer_memory_mb: u64,
}

impl Settings {
    pub fn from_config(cfg: &ClusterConfig) -> Result<Settings, ConfigError> {
        let s: RunnerSection = cfg.section("runner")?;
        Settings::validate(cfg, s)
    }

    fn validate(cfg: &ClusterConfig, s: RunnerSection) -> Result<Settings, ConfigError> {
        if s.port_min == 0 || s.port_min > s.port_max {
            return Err(cfg.invalid(
                "daemons.runner.port_min",
                format!("port range {}-{} is not valid", s.port_min, s.port_max),
            ));
        }
        if let Some(e) = s
            .log_sink
            .as_deref()
            .filter(|e| !paddock_config::is_endpoint(e))
        {
            return Err(cfg.invalid(
                "daemons.runner.log_sink",
                format!("`{e}` is not tcp://host:port or ipc://path"),
            ));
        }
        if s.backoff_base_ms > s.backoff_cap_ms {
            return Err(cfg.invalid(
                "daemons.runner.backoff_base_ms",
                "must not exceed backoff_cap_ms".into(),
            ));
        }
        for (key, v) in [("nofile", s.nofile), ("pids", s.pids)] {
            if v == 0 {
                return Err(cfg.invalid(
                    &format!("daemons.runner.{key}"),
                    "must be at least 1".into(),
                ));
            }
        }
        let advertise = match s.advertise.as_deref() {
            None => std::net::IpAddr::from([127, 0, 0, 1]),
            Some(a) => a.trim().parse().map_err(|_| {
                cfg.invalid(
                    "daemons.runner.advertise",
                    format!("`{a}` is not an IP address (the address others reach this node at)"),
                )
            })?,
        };
        let offer_memory_mb = match s.offer_memory_mb {
            Some(mb) => mb,
            None => mem_total_mb().map(|total| total * 8 / 10).ok_or_else(|| {
                cfg.invalid(
                    "daemons.runner.offer_memory_mb",
                    "not set, and MemTotal cannot be read from /proc/meminfo; set it".into(),
                )
            })?,
        };
        Ok(Settings {
            advertise,
            offer_memory_mb,
            log_sink: s.log_sink,
            port_min: s.port_min,
            port_max: s.port_max,
            apps_dir: s.apps_dir.unwrap_or_else(|| cfg.state_dir.join("apps")),
            instances_dir: s
                .instances_dir
                .unwrap_or_else(|| cfg.state_dir.join("runner")),
            cgroup_root: s.cgroup_root,
            stop_grace: s.stop_grace_ms.get(),
            start_timeout: s.start_timeout_ms.get(),
            health_interval: s.health_interval_ms.get(),
            health_failures: s.health_failures.max(1),
            none_up_after: s.none_up_after_ms.get(),
            restart_limit: s.restart_limit,
            restart_window: s.restart_window_ms.get(),
            backoff_base: s.backoff_base_ms.get(),
            backoff_cap: s.backoff_cap_ms.get(),
            backoff_reset: s.backoff_reset_ms.get(),
            log_max_bytes: s.log_max_bytes,
            nofile: s.nofile,
            pids: s.pids,
            memory_mb: (s.memory_mb > 0).then_some(s.memory_mb),
            stopped_keep: s.stopped_keep_ms.get(),
        })
    }
}

/// The node's memory in MiB, from /proc/meminfo's `MemTotal: N kB`.
fn mem_total_mb() -> Option<u64> {
    parse_mem_total(&std::fs::read_to_string("/proc/meminfo").ok()?)
}

fn parse_mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_total_is_read_in_mib() {
        let text = "MemTotal:        8049316 kB\nMemFree:  1 kB\n";
        assert_eq!(parse_mem_total(text), Some(7860));
        assert_eq!(parse_mem_total("MemFree: 1 kB\n"), None);
        assert!(mem_total_mb().is_some_and(|m| m > 0));
    }

    #[test]
    fn shipped_example_configs_have_a_valid_runner_section() {
        for (p, cfg) in paddock_config::shipped_examples() {
            Settings::from_config(&cfg).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        }
    }
}
