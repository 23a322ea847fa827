//! Typed bodies of the kinds this build implements (docs/PROTOCOL.md lists them all).
//! Unknown fields are ignored on the way in; replies get `ok: true` added by the server.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::WireError;

/// Reads a request body as `T`; a wrong or missing field is `invalid`, naming it.
pub fn parse_body<T: DeserializeOwned>(kind: &str, body: &Value) -> Result<T, WireError> {
    T::deserialize(body).map_err(|e| WireError::invalid(format!("{kind}: {e}")))
}

/// A body as JSON.
pub fn to_body<T: Serialize>(t: &T) -> Value {
    serde_json::to_value(t).expect("bodies serialize")
}

pub const PING: &str = "ping";
pub const STATS: &str = "stats";

/// `ping` reply.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Pong {
    pub daemon: String,
    pub node: String,
    /// The random id of this daemon process's start (never an app instance).
    #[serde(alias = "instance")]
    pub incarnation: String,
    pub version: String,
    pub uptime_ms: u64,
}

pub const HEARTBEAT_BEAT: &str = "heartbeat.beat";
pub const REGISTRY_LIST: &str = "registry.list";
pub const REGISTRY_UP: &str = "registry.up";
pub const REGISTRY_DOWN: &str = "registry.down";

/// `heartbeat.beat` body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Beat {
    pub daemon: String,
    pub node: String,
    /// The sender's incarnation; `instance` is read too, from senders that predate
    /// the rename.
    #[serde(alias = "instance")]
    pub incarnation: String,
    #[serde(default)]
    pub endpoints: BTreeMap<String, String>,
    pub interval_ms: u64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum ServiceState {
    Alive,
    Suspect,
    Dead,
}

impl ServiceState {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceState::Alive => "alive",
            ServiceState::Suspect => "suspect",
            ServiceState::Dead => "dead",
        }
    }
}

/// One entry of the registry (`registry.list`, `registry.up`, `registry.down`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Service {
    pub daemon: String,
    pub node: String,
    #[serde(alias = "instance")]
    pub incarnation: String,
    pub endpoints: BTreeMap<String, String>,
    pub state: ServiceState,
    pub last_seen: i64,
    #[serde(default)]
    pub interval_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ServiceList {
    pub services: Vec<Service>,
}

pub const LOCK_ACQUIRE: &str = "lock.acquire";
pub const LOCK_RENEW: &str = "lock.renew";
pub const LOCK_RELEASE: &str = "lock.release";
pub const LOCK_CHECK: &str = "lock.check";
pub const LOCK_LIST: &str = "lock.list";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LockAcquire {
    pub name: String,
    pub owner: String,
    pub ttl_ms: u64,
    #[serde(default)]
    pub wait_ms: u64,
}

/// Reply to `lock.acquire` and `lock.renew`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LockGrant {
    pub token: i64,
    pub expires: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LockRenew {
    pub name: String,
    pub token: i64,
    pub ttl_ms: u64,
}

/// Body of `lock.release` and `lock.check`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LockToken {
    pub name: String,
    pub token: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LockValid {
    pub valid: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LockInfo {
    pub name: String,
    pub owner: String,
    pub token: i64,
    pub expires: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LockList {
    pub locks: Vec<LockInfo>,
}

pub const INSTANCE_START: &str = "instance.start";
pub const INSTANCE_STOP: &str = "instance.stop";
pub const INSTANCE_RESTART: &str = "instance.restart";
pub const INSTANCE_RELOAD: &str = "instance.reload";
pub const INSTANCE_LOGS: &str = "instance.logs";
pub const INSTANCE_LIST: &str = "instance.list";
pub const INSTANCE_UP: &str = "instance.up";
pub const INSTANCE_DOWN: &str = "instance.down";
pub const INSTANCE_CRASHED: &str = "instance.crashed";
pub const LOG_LINE: &str = "log.line";
/// Forgets an app on this runner once none of its instances runs: their records,
/// logs, homes and cgroups, and the app's account (`app.destroy` sends it).
pub const APP_PURGE: &str = "app.purge";

/// Body of `app.purge`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AppPurge {
    pub app: String,
}

/// `instance.start` body. Optional fields take the runner's configured defaults.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InstanceStart {
    pub app: String,
    pub proc: String,
    pub dir: String,
    /// A Procfile-style command line: run as `sh -c 'exec COMMAND'` when it has
    /// shell syntax, else split on spaces and exec'd. Give this or `argv`.
    #[serde(default)]
    pub command: String,
    /// The program and its arguments, exec'd as given (no shell, no splitting).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub argv: Option<Vec<String>>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub health: Health,
    #[serde(default)]
    pub limits: InstanceLimits,
    #[serde(default)]
    pub restart: RestartPolicy,
    /// Signal names without "SIG": stop (default TERM) and reload (default HUP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_signal: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reload_signal: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_grace_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_interval_ms: Option<u64>,
    /// Stop the instance once no scheduler has reached this runner (a fenced
    /// call, or `instance.list` with a token) for this long: for workers that
    /// must never run twice when their node is cut off and they are placed
    /// elsewhere. Absent: it keeps running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_after_disconnect_ms: Option<u64>,
    /// The caller's id for the instance (`[a-z0-9.-]`, 1-100, starting with a
    /// letter or digit); the runner makes one up when absent. A start with the id
    /// of an instance the runner has and the same body (`token` aside) answers as
    /// the first one did; with another body it is `conflict`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The sender's fencing token (a scheduler's locker lease): refused as
    /// `stale_token` when smaller than the largest the runner has accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<u64>,
    /// Who places the instance; `operator` by default.
    #[serde(default)]
    pub owner: Owner,
}

/// Who placed an instance: a scheduler never touches an operator's.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Owner {
    Scheduler,
    #[default]
    Operator,
}

impl Owner {
    pub fn as_str(self) -> &'static str {
        match self {
            Owner::Scheduler => "scheduler",
            Owner::Operator => "operator",
        }
    }
}

/// `{"http": "/path"}`, `{"tcp": true}` or `{"none": true}`; default tcp.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Health {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub none: Option<bool>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct InstanceLimits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nofile: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_weight: Option<u64>,
}

/// Restart policy; every field optional (the runner's defaults apply).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct RestartPolicy {
    /// Respawn limit: at most `limit` restarts within `window_ms`, else `crashed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_ms: Option<u64>,
    /// Exponential backoff after the first (immediate) restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_base_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_cap_ms: Option<u64>,
    /// Backoff resets after the instance stays up this long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reset_after_ms: Option<u64>,
    /// Exit codes that are a normal end, not a crash (upstart's `normal exit`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub normal_exit: Option<Vec<i32>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InstanceStarted {
    pub id: String,
    pub port: u16,
    /// `IP:PORT` at the node's advertised address (absent from older runners).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<String>,
}

/// Body of `instance.stop`, `instance.restart`, `instance.reload`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InstanceId {
    pub id: String,
    /// The sender's fencing token, as for `instance.start`; none: not fenced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InstanceLogs {
    pub id: String,
    #[serde(default = "default_lines")]
    pub lines: usize,
}

fn default_lines() -> usize {
    100
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LogLine {
    pub ts: i64,
    pub stream: String,
    pub line: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LogLines {
    pub lines: Vec<LogLine>,
}

/// How an instance last ended.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LastExit {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub oom: bool,
    pub at: i64,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InstanceInfo {
    pub id: String,
    pub app: String,
    pub proc: String,
    pub pid: Option<i32>,
    pub port: u16,
    /// starting, up, backoff, crashed, stopping, stopped
    pub state: String,
    pub restarts: u32,
    pub uptime_ms: u64,
    pub last_exit: Option<LastExit>,
    #[serde(default)]
    pub node: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// `IP:PORT` at the node's advertised address; null without a port (and
    /// from older runners).
    #[serde(default)]
    pub addr: Option<String>,
    /// The release version a release-form instance runs; null for `dir` form.
    #[serde(default)]
    pub release: Option<i64>,
    /// The fencing token of the start that placed it; null when none was given.
    #[serde(default)]
    pub token: Option<u64>,
    /// When its health check first passed in the current run of the app (epoch
    /// ms); null while it is not up.
    #[serde(default)]
    pub up_at: Option<i64>,
    #[serde(default)]
    pub owner: Owner,
    /// Its memory limit (the request's, else the runner's default); null: none.
    #[serde(default)]
    pub memory_mb: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InstanceList {
    pub instances: Vec<InstanceInfo>,
}

/// What a runner offers and holds: `runner.info {}` → this.
pub const RUNNER_INFO: &str = "runner.info";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunnerInfo {
    pub node: String,
    /// The memory this runner offers to instances (`[daemons.runner]
    /// offer_memory_mb`, default 80% of the node's).
    pub offer_memory_mb: u64,
    /// The memory limits of its instances that are not stopped, summed.
    pub used_memory_mb: u64,
    /// How many of its instances are not stopped.
    pub instances: u64,
    /// The largest fencing token it has accepted (null: none yet).
    pub max_token: Option<u64>,
}

pub const RUN_START: &str = "run.start";
pub const RUN_INPUT: &str = "run.input";
pub const RUN_RESIZE: &str = "run.resize";
pub const RUN_OUTPUT: &str = "run.output";
pub const RUN_KILL: &str = "run.kill";

/// `run.start`: a one-off command in an app's environment, as its user, on a PTY.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunStart {
    pub app: String,
    pub dir: String,
    /// A shell command line (`sh -c 'exec COMMAND'`). Give this or `argv`.
    #[serde(default)]
    pub command: String,
    /// The program and its arguments, exec'd as given (no shell, no splitting).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub argv: Option<Vec<String>>,
    /// The one-off's own cgroup limits (the runner's defaults where unset).
    #[serde(default)]
    pub limits: InstanceLimits,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default = "default_cols")]
    pub cols: u16,
    #[serde(default = "default_rows")]
    pub rows: u16,
}

fn default_cols() -> u16 {
    80
}
fn default_rows() -> u16 {
    24
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunStarted {
    pub id: String,
    pub pid: i32,
}

/// `run.input`: bytes for the terminal, base64.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunInput {
    pub id: String,
    pub data: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunResize {
    pub id: String,
    pub cols: u16,
    pub rows: u16,
}

/// `run.output`: output after byte offset `offset`, waiting up to `wait_ms` for some.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunOutputReq {
    pub id: String,
    #[serde(default)]
    pub offset: u64,
    #[serde(default)]
    pub wait_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunOutput {
    /// base64 of the bytes from `offset` to `next_offset`.
    pub data: String,
    pub next_offset: u64,
    /// Set once the command ended and every byte was returned.
    pub exit_code: Option<i32>,
    pub done: bool,
}

// ---- api: customers' operations (docs/PROTOCOL.md, "api") ----
/// An app's instances on every runner, for the app's users.
pub const APP_INSTANCES: &str = "app.instances";
/// An app's instances' log lines, merged in time order.
pub const APP_LOGS: &str = "app.logs";
/// The trail of each deploy, from the app's audit log.
pub const DEPLOY_LIST: &str = "deploy.list";
pub const DEPLOY_INFO: &str = "deploy.info";
/// A rolling restart of an app (or one process type), asked of the scheduler.
pub const PS_RESTART: &str = "ps.restart";

// ---- scheduler, as the api calls it ----
pub const SCHEDULER_STATUS: &str = "scheduler.status";
/// Whether an app's whole new formation can be placed.
pub const FORMATION_CHECK: &str = "formation.check";
/// A rolling restart of an app's current release.
pub const APP_RESTART: &str = "app.restart";

// ---- balancer (docs/PROTOCOL.md, "Balancer") ----
pub const ROUTE_SET: &str = "route.set";
pub const ROUTE_REMOVE: &str = "route.remove";
pub const ROUTES_LIST: &str = "routes.list";
pub const BACKEND_ADD: &str = "backend.add";
pub const BACKEND_DRAIN: &str = "backend.drain";
pub const BACKEND_REMOVE: &str = "backend.remove";
/// PUB: a drained backend has nothing left in flight (or its drain deadline passed).
pub const BACKEND_DRAINED: &str = "backend.drained";
pub const CERT_SET: &str = "cert.set";
pub const CERT_REMOVE: &str = "cert.remove";
pub const CERT_LIST: &str = "cert.list";
pub const BALANCER_STATS: &str = "balancer.stats";
pub const BALANCER_UPGRADE: &str = "balancer.upgrade";
/// PUB by a scheduler: its whole, fenced route table.
pub const ROUTES_TABLE: &str = "routes.table";
/// rpc to a scheduler: the same table, on demand.
pub const ROUTES_SNAPSHOT: &str = "routes.snapshot";
