//! The scheduler's own view of the cluster: plain data, no serde. The actor fills
//! these from the api (desired state), the runners (actual instances) and the
//! heartbeat registry (nodes); the rules in `placement`, `deploy`, `reconcile`
//! and `routes` read them. Wire types stay in `paddock-wire`.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

pub type AppName = String;
pub type NodeId = String;
pub type InstanceId = String;
pub type Proc = String;

/// A locker fencing token: stamped on every command the scheduler sends.
pub type Token = u64;

/// One release of an app, as far as running it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    pub version: u64,
    pub slug: String,
    /// Process type → command line.
    pub process_types: BTreeMap<Proc, String>,
    /// Config vars plus what the platform adds (PORT excepted: the runner's).
    pub env: BTreeMap<String, String>,
}

/// How many instances of one process type, and how big.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scale {
    pub quantity: u32,
    pub memory_mb: u64,
}

/// Process type → scale.
pub type Formation = BTreeMap<Proc, Scale>;

/// How the runner decides an instance is up.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum HealthCheck {
    Http(String),
    #[default]
    Tcp,
    /// Workers without a port: up once they stayed running.
    None,
}

/// What the api says an app should be.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredApp {
    pub name: AppName,
    /// The release serving now (None: never released).
    pub release: Option<Release>,
    /// A release waiting to be rolled out.
    pub pending: Option<Release>,
    pub formation: Formation,
    pub domains: Vec<String>,
    pub health: BTreeMap<Proc, HealthCheck>,
}

/// An instance's state, as its runner reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceState {
    Starting,
    Up,
    Backoff,
    Crashed,
    Stopping,
    Stopped,
}

impl InstanceState {
    /// Stopping or stopped: it no longer counts for anything.
    pub fn is_gone(self) -> bool {
        matches!(self, InstanceState::Stopping | InstanceState::Stopped)
    }
}

/// Who placed an instance. The scheduler never touches an operator's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    Scheduler,
    Operator,
}

/// One instance as the runners report it.
#[derive(Debug, Clone, PartialEq)]
pub struct Instance {
    pub id: InstanceId,
    pub app: AppName,
    pub proc: Proc,
    pub version: u64,
    pub node: NodeId,
    /// host:port once the runner allotted one; None for workers without a port.
    pub addr: Option<String>,
    pub state: InstanceState,
    /// When its health check first passed (this run).
    pub up_at: Option<Instant>,
    pub memory_mb: u64,
    /// The fencing token of the command that placed it.
    pub token: Token,
    pub owner: Owner,
    pub restarts: u32,
}

/// A runner node's liveness, as the heartbeat registry says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    Alive,
    Suspect,
    Dead,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub id: NodeId,
    pub liveness: Liveness,
    /// When it last became alive (from dead or new): a node that came back less
    /// than `node_settle` ago gets no new work.
    pub alive_since: Instant,
    /// The memory its runner offers to instances.
    pub offer_memory_mb: u64,
}

pub type Registry = BTreeMap<NodeId, Node>;

/// The scheduler's timings and limits (its config section, validated).
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// A new instance must stay up this long, from `up_at`, before an old one goes.
    pub min_healthy: Duration,
    /// A new instance must be up within this of its start.
    pub healthy_deadline: Duration,
    /// The whole rollout (and, separately, a rollback) must finish within this.
    pub progress_deadline: Duration,
    /// After going live, a crash loop within this rolls back.
    pub watch_window: Duration,
    /// This many restarts of a new instance is a crash loop.
    pub crash_restarts: u32,
    /// How long a drained backend has before its stop (unless confirmed sooner).
    pub drain_period: Duration,
    /// A node that came back alive gets no new work for this long.
    pub node_settle: Duration,
}

/// A start command: where, what, under which token.
#[derive(Debug, Clone, PartialEq)]
pub struct StartInstance {
    pub id: InstanceId,
    pub app: AppName,
    pub proc: Proc,
    pub version: u64,
    pub node: NodeId,
    pub memory_mb: u64,
    pub token: Token,
}

/// A stop command, fenced.
#[derive(Debug, Clone, PartialEq)]
pub struct StopInstance {
    pub id: InstanceId,
    pub token: Token,
}

/// Only `web` instances take HTTP traffic (Heroku's rule).
pub fn is_routed(proc: &str) -> bool {
    proc == "web"
}

/// A fresh instance id, deterministic and unique among `taken`:
/// `APP.PROC.vVERSION.tTOKEN.N` with the smallest free N. The token in it keeps
/// two leaders from ever naming two instances alike.
pub fn new_id<'a>(
    app: &str,
    proc: &str,
    version: u64,
    token: Token,
    taken: impl IntoIterator<Item = &'a str>,
) -> InstanceId {
    let prefix = format!("{app}.{proc}.v{version}.t{token}.");
    let max = taken
        .into_iter()
        .filter_map(|id| id.strip_prefix(&prefix)?.parse::<u64>().ok())
        .max()
        .unwrap_or(0);
    format!("{prefix}{}", max + 1)
}

/// A formation (or one process type of it) that cannot be fully placed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shortfall {
    pub app: AppName,
    pub proc: Proc,
    pub placed: u32,
    pub wanted: u32,
}

impl fmt::Display for Shortfall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} of {} {} instances of {} placed: not enough runner memory on settled nodes",
            self.placed, self.wanted, self.proc, self.app
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_ids_take_the_smallest_free_number_after_the_largest() {
        let taken = [
            "a.web.v2.t7.1",
            "a.web.v2.t7.3",
            "a.web.v1.t7.9",
            "b.web.v2.t7.5",
        ];
        assert_eq!(new_id("a", "web", 2, 7, taken), "a.web.v2.t7.4");
        assert_eq!(new_id("a", "web", 2, 8, taken), "a.web.v2.t8.1");
        assert_eq!(new_id("a", "worker", 2, 7, []), "a.worker.v2.t7.1");
    }

    #[test]
    fn a_shortfall_says_n_of_m() {
        let s = Shortfall {
            app: "shop".into(),
            proc: "web".into(),
            placed: 2,
            wanted: 5,
        };
        assert!(s
            .to_string()
            .starts_with("2 of 5 web instances of shop placed"));
    }
}
