//! What the runner and a per-instance shim say to each other over the shim's unix
//! socket: one JSON object per line. Both ends are built from this crate, and the
//! socket lives in a root-only directory, so this is a private local protocol, not
//! part of the wire protocol (docs/ARCHITECTURE.md, runner).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Everything the shim needs to start the app, written by the runner to
/// `<instance dir>/spec.json` before the shim starts.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ShimSpec {
    pub id: String,
    /// The Procfile-style command: split on spaces and exec'd when it has no
    /// shell syntax, else run as `sh -c 'exec COMMAND'`; the tracked pid is the
    /// app's own either way.
    pub command: String,
    /// When set, exec'd as given (no shell); `command` is then only for display.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub argv: Option<Vec<String>>,
    pub dir: PathBuf,
    /// The complete environment (nothing is inherited).
    pub env: BTreeMap<String, String>,
    pub uid: u32,
    pub gid: u32,
    pub nofile: u64,
    pub nproc: Option<u64>,
    /// `cgroup.procs` files the app joins between fork and exec.
    pub cgroup_procs: Vec<PathBuf>,
    /// `cgroup.procs` files the shim joins once at start, so every app process it
    /// forks is born inside them (a v1 memory cgroup migration costs milliseconds).
    /// Never the freezer or a v2 cgroup: the shim must not freeze or kill itself.
    #[serde(default)]
    pub shim_cgroup_procs: Vec<PathBuf>,
    /// `cgroup.procs` files the shim moves the app into right after exec (the v1
    /// freezer, which exists only for the exact kill): a migration waits for an RCU
    /// grace period, about 15 ms here, and must not delay the restart.
    #[serde(default)]
    pub late_cgroup_procs: Vec<PathBuf>,
    /// How to kill everything in the instance's cgroup.
    pub cgroup_kill: Option<CgroupKill>,
    /// A file whose `oom_kill N` line counts OOM kills in the instance's cgroup.
    pub oom_counter: Option<PathBuf>,
    pub log_file: PathBuf,
    pub log_max_bytes: u64,
    /// Release instances: the unpacked slug seen at `/app` through an overlay
    /// whose writable layer is made new, empty, before every start (absent from
    /// `dir`-form instances and from specs written before releases).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_mount: Option<OverlaySpec>,
}

/// Where a release instance's `/app` comes from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OverlaySpec {
    /// The unpacked slug (read-only layer).
    pub lower: PathBuf,
    /// A root-only directory for the per-start `upper`/`work` pairs.
    pub layers: PathBuf,
}

/// The exact way to kill every process of an instance.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum CgroupKill {
    /// cgroup v2: write `1` to `cgroup.kill`.
    V2 { kill_file: PathBuf },
    /// cgroup v1: freeze, SIGKILL every pid in `procs`, thaw.
    V1 {
        freezer_state: PathBuf,
        procs: PathBuf,
    },
}

/// How the app ended.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExitInfo {
    pub pid: i32,
    pub code: Option<i32>,
    pub signal: Option<i32>,
    /// The kernel's OOM killer ended it (the cgroup's oom_kill counter rose).
    pub oom: bool,
    /// Epoch ms.
    pub at: i64,
    /// The shim restarted the app at once by itself (it was armed).
    #[serde(default)]
    pub restarted: bool,
}

impl ExitInfo {
    pub fn describe(&self) -> String {
        match (self.code, self.signal, self.oom) {
            (_, _, true) => "killed by the OOM killer (memory limit)".to_string(),
            (Some(c), _, _) => format!("exit code {c}"),
            (None, Some(s), _) => format!(
                "killed by signal {s} ({})",
                nix::sys::signal::Signal::try_from(s)
                    .map(|s| s.as_str())
                    .unwrap_or("?")
            ),
            _ => "ended".to_string(),
        }
    }
}

/// The version of this protocol a shim speaks, sent in its `Hello`. Version 0 is
/// the first shim's, whose `Hello` has no `proto` field; it knows every command
/// below. A runner keeps talking to the shims of older versions it finds (they
/// keep running apps across runner upgrades) and sends each only the commands its
/// version knows.
pub const SHIM_PROTO: u32 = 1;

/// Shim → runner.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "ev", rename_all = "snake_case")]
pub enum ShimEvent {
    /// First line after connecting: the app's current pid (if running) and the
    /// last exit (if any).
    Hello {
        /// [`SHIM_PROTO`] of the shim; absent (0) from the first shim.
        #[serde(default)]
        proto: u32,
        pid: Option<i32>,
        started_ns: Option<i64>,
        last_exit: Option<ExitInfo>,
    },
    /// The app was started (`started_ns`: CLOCK_REALTIME ns once the exec
    /// succeeded).
    Started {
        pid: i32,
        started_ns: i64,
    },
    Exited(ExitInfo),
    /// One line of output.
    Log {
        ts: i64,
        stream: String,
        line: String,
    },
    /// After `stop`: the app and everything it started are gone.
    Stopped,
    /// A command could not be carried out.
    Error {
        message: String,
    },
}

/// Runner → shim.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ShimCommand {
    /// Start the app again (after an exit).
    Start,
    /// Send a signal to the app (reload).
    Signal {
        sig: i32,
    },
    /// Stop: `sig` to the app's process group, then after `grace_ms` SIGKILL to
    /// everything the instance started. Answered by `Stopped`.
    Stop {
        sig: i32,
        grace_ms: u64,
    },
    /// Kill everything and exit the shim.
    Exit,
    /// Restart the app at once, without asking, on its next exit whose code is not
    /// in `normal_exit` (signals always count). Used once, then disarmed. The
    /// runner arms a shim whenever its next restart would be immediate anyway (and
    /// again after every new connection, since a shim's Hello does not say whether
    /// it is armed), so a restart costs no round trip and happens while no runner
    /// is running.
    Arm {
        normal_exit: Vec<i32>,
    },
    Disarm,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spec_written_before_releases_has_no_app_mount() {
        let old = r#"{"id":"a-web-1","command":"python3 app.py","dir":"/srv/a","env":{},
            "uid":1001,"gid":1001,"nofile":4096,"nproc":null,"cgroup_procs":[],
            "cgroup_kill":null,"oom_counter":null,"log_file":"/x/app.log","log_max_bytes":1024}"#;
        let spec: ShimSpec = serde_json::from_str(old).unwrap();
        assert_eq!(spec.app_mount, None);
        let text = serde_json::to_string(&spec).unwrap();
        assert!(!text.contains("app_mount"), "{text}");
    }

    #[test]
    fn the_first_shims_hello_without_a_version_is_protocol_0() {
        let ev: ShimEvent =
            serde_json::from_str(r#"{"ev":"hello","pid":12,"started_ns":5,"last_exit":null}"#)
                .unwrap();
        assert_eq!(
            ev,
            ShimEvent::Hello {
                proto: 0,
                pid: Some(12),
                started_ns: Some(5),
                last_exit: None
            }
        );
        let now = serde_json::to_string(&ShimEvent::Hello {
            proto: SHIM_PROTO,
            pid: None,
            started_ns: None,
            last_exit: None,
        })
        .unwrap();
        assert!(now.contains(&format!("\"proto\":{SHIM_PROTO}")), "{now}");
    }
}
