//! The one-offs started through this api (`run.start`): which runner holds each
//! and whose it is. The customer sees only the api's own id for a run (128
//! random bits), never the runner's, and every later `run.*` must come from the
//! same actor (`user:NAME`) that started it: anyone else is told there is no such
//! run, as for an id that never existed.
//!
//! This is the api's only memory of its own, and it is a cache of routing, not a
//! record: bounded ([`MAX_RUNS`], [`MAX_PER_OWNER`]), forgotten when idle
//! ([`IDLE`]) or soon after the run ended ([`DONE_KEEP`]). A run is reachable
//! through the api that started it (a customer's CLI talks to one api); after
//! that api restarts its runs can no longer be attached to, and the runner ends
//! them when their command ends.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use paddock_wire::{Code, WireError};
use rand::RngCore;

/// Runs remembered at most, across every user.
pub const MAX_RUNS: usize = 256;
/// Runs one actor may have at once.
pub const MAX_PER_OWNER: usize = 8;
/// A run nobody asked about for this long is forgotten (and killed if it still
/// runs): its CLI is gone. An attached CLI asks for output every few seconds.
pub const IDLE: Duration = Duration::from_secs(600);
/// How long a run that ended stays known (a client may ask for the end again).
pub const DONE_KEEP: Duration = Duration::from_secs(60);
/// How often the caller's access to the run's app is checked again while it is
/// used (a collaborator removed meanwhile loses the run).
pub const RECHECK: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct Run {
    /// Who started it, as the audit log names actors (`user:alice`).
    pub owner: String,
    pub app: String,
    /// The runner's rpc endpoint, its node and its own id for the run; empty
    /// while the start is under way.
    pub runner: String,
    pub node: String,
    pub remote: String,
    pub done: bool,
    /// When access to `app` was last checked.
    pub checked: Instant,
    used: Instant,
}

impl Run {
    fn starting(&self) -> bool {
        self.remote.is_empty()
    }

    fn expired(&self, now: Instant) -> bool {
        let keep = if self.done { DONE_KEEP } else { IDLE };
        now.saturating_duration_since(self.used) >= keep
    }
}

#[derive(Debug, Default)]
pub struct Runs {
    runs: HashMap<String, Run>,
}

/// A fresh run id: `run-` and 32 lowercase hex digits from the OS's random source.
pub fn new_id() -> String {
    let mut b = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut b);
    format!("run-{}", hex::encode(b))
}

/// Whether `id` has the form [`new_id`] makes.
pub fn valid_id(id: &str) -> bool {
    id.strip_prefix("run-").is_some_and(|h| {
        h.len() == 32
            && h.bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
    })
}

fn no_such(id: &str) -> WireError {
    WireError::new(
        Code::NotFound,
        format!(
            "no one-off {id} of yours here: it ended more than a minute ago, was idle for 10 minutes, or was started through another api"
        ),
    )
}

impl Runs {
    /// Forgets expired runs; returns those that had not ended, for the caller to
    /// kill on their runners.
    pub fn sweep(&mut self, now: Instant) -> Vec<Run> {
        let gone: Vec<String> = self
            .runs
            .iter()
            .filter(|(_, r)| r.expired(now))
            .map(|(id, _)| id.clone())
            .collect();
        gone.into_iter()
            .filter_map(|id| self.runs.remove(&id))
            .filter(|r| !r.done && !r.starting())
            .collect()
    }

    /// Holds a place for a run `owner` is starting on `app` (so concurrent starts
    /// count against the bounds too); its id.
    pub fn reserve(&mut self, owner: &str, app: &str, now: Instant) -> Result<String, WireError> {
        let mine = self.runs.values().filter(|r| r.owner == owner).count();
        if mine >= MAX_PER_OWNER {
            return Err(WireError::new(
                Code::Conflict,
                format!(
                    "you have {mine} one-offs running through this api (at most {MAX_PER_OWNER}); end one first"
                ),
            ));
        }
        if self.runs.len() >= MAX_RUNS {
            return Err(WireError::unavailable(format!(
                "this api is attached to {MAX_RUNS} one-offs already; retry in a minute"
            )));
        }
        let id = new_id();
        self.runs.insert(
            id.clone(),
            Run {
                owner: owner.to_string(),
                app: app.to_string(),
                runner: String::new(),
                node: String::new(),
                remote: String::new(),
                done: false,
                checked: now,
                used: now,
            },
        );
        Ok(id)
    }

    /// The start went through: where the run is.
    pub fn started(&mut self, id: &str, runner: &str, node: &str, remote: &str, now: Instant) {
        if let Some(r) = self.runs.get_mut(id) {
            r.runner = runner.to_string();
            r.node = node.to_string();
            r.remote = remote.to_string();
            r.used = now;
        }
    }

    /// The start failed: the place is freed.
    pub fn cancel(&mut self, id: &str) {
        self.runs.remove(id);
    }

    /// Run `id` for `owner` (marked used); `not_found` for anyone else's, one
    /// still starting or one forgotten, alike.
    pub fn get(&mut self, id: &str, owner: &str, now: Instant) -> Result<Run, WireError> {
        match self.runs.get_mut(id) {
            Some(r) if r.owner == owner && !r.starting() && !r.expired(now) => {
                r.used = now;
                Ok(r.clone())
            }
            _ => Err(no_such(id)),
        }
    }

    /// Access to the run's app was checked again at `now`.
    pub fn checked(&mut self, id: &str, now: Instant) {
        if let Some(r) = self.runs.get_mut(id) {
            r.checked = now;
        }
    }

    /// The run's command ended (its output said so, or it was killed).
    pub fn ended(&mut self, id: &str, now: Instant) {
        if let Some(r) = self.runs.get_mut(id) {
            r.done = true;
            r.used = now;
        }
    }

    /// Forgets run `id` (its owner lost access to the app).
    pub fn forget(&mut self, id: &str) -> Option<Run> {
        self.runs.remove(id)
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.runs.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_random_and_well_formed() {
        let a = new_id();
        let b = new_id();
        assert_ne!(a, b);
        assert!(valid_id(&a) && valid_id(&b), "{a} {b}");
        assert_eq!(a.len(), 36);
        for bad in [
            "",
            "run-",
            "run-0123",
            "run-0123456789abcdef0123456789ABCDEF",
            "run-0123456789abcdef0123456789abcdeg",
            "xyz-0123456789abcdef0123456789abcdef",
            "run-01jd8x2k3m4n5p6q7r8s9t0v1w",
        ] {
            assert!(!valid_id(bad), "{bad}");
        }
    }

    #[test]
    fn only_the_owner_reaches_a_run_and_only_once_it_started() {
        let t0 = Instant::now();
        let mut runs = Runs::default();
        let id = runs.reserve("user:alice", "shop", t0).unwrap();
        // Still starting: nobody reaches it, the owner neither.
        assert_eq!(
            runs.get(&id, "user:alice", t0).unwrap_err().code,
            Code::NotFound
        );
        runs.started(&id, "tcp://r:1", "node-a", "run-01abc", t0);
        let r = runs.get(&id, "user:alice", t0).unwrap();
        assert_eq!(
            (r.runner.as_str(), r.remote.as_str()),
            ("tcp://r:1", "run-01abc")
        );
        // Another user, and the cluster, get the very same answer as for an id
        // that never existed.
        let other = runs.get(&id, "user:bob", t0).unwrap_err();
        let never = runs
            .get("run-00000000000000000000000000000000", "user:bob", t0)
            .unwrap_err();
        assert_eq!(other.code, Code::NotFound);
        assert_eq!(
            other.message.replace(&id, "ID"),
            never
                .message
                .replace("run-00000000000000000000000000000000", "ID")
        );
        assert!(runs.get(&id, "cluster:user:test", t0).is_err());
    }

    #[test]
    fn runs_expire_when_idle_or_after_they_ended_and_unended_ones_are_returned_to_kill() {
        let t0 = Instant::now();
        let mut runs = Runs::default();
        let a = runs.reserve("user:alice", "shop", t0).unwrap();
        runs.started(&a, "tcp://r:1", "n", "ra", t0);
        let b = runs.reserve("user:alice", "shop", t0).unwrap();
        runs.started(&b, "tcp://r:1", "n", "rb", t0);
        let c = runs.reserve("user:alice", "shop", t0).unwrap();
        runs.started(&c, "tcp://r:1", "n", "rc", t0);
        runs.ended(&b, t0);
        // Used: not idle.
        let t1 = t0 + IDLE - Duration::from_secs(1);
        runs.get(&c, "user:alice", t1).unwrap();
        assert!(runs.sweep(t0 + DONE_KEEP).is_empty());
        assert!(
            runs.get(&b, "user:alice", t0 + DONE_KEEP).is_err(),
            "ended and kept only a minute"
        );
        let killed = runs.sweep(t0 + IDLE);
        assert_eq!(killed.len(), 1);
        assert_eq!(killed[0].remote, "ra", "the idle run that still ran");
        assert_eq!(runs.len(), 1, "c was used since");
        assert!(runs.sweep(t1 + IDLE).iter().any(|r| r.remote == "rc"));
        assert_eq!(runs.len(), 0);
    }

    #[test]
    fn runs_are_bounded_per_owner_and_in_all() {
        let t0 = Instant::now();
        let mut runs = Runs::default();
        for _ in 0..MAX_PER_OWNER {
            runs.reserve("user:alice", "shop", t0).unwrap();
        }
        let e = runs.reserve("user:alice", "shop", t0).unwrap_err();
        assert_eq!(e.code, Code::Conflict);
        assert!(e.message.contains("at most 8"), "{}", e.message);
        // A cancelled start frees its place.
        let mut runs = Runs::default();
        let id = runs.reserve("user:bob", "shop", t0).unwrap();
        runs.cancel(&id);
        assert_eq!(runs.len(), 0);
        for i in 0..MAX_RUNS {
            runs.reserve(&format!("user:u{i}"), "shop", t0).unwrap();
        }
        let e = runs.reserve("user:new", "shop", t0).unwrap_err();
        assert_eq!(e.code, Code::Unavailable);
    }
}
