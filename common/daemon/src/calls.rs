//! Daemon-to-daemon calls: the wire's outgoing client (carried by the daemon's I/O
//! thread) plus discovery through the heartbeat registry, so no daemon opens its own
//! sockets or invents its own way of finding a peer.
//!
//! `find("locker")` asks every configured heartbeat (`ClusterConfig::registries`)
//! for `registry.list` through the same client, merges the answers, and keeps them
//! for [`DISCOVERY_TTL`]; meanwhile it follows `registry.up`/`registry.down` on the
//! heartbeats' PUB sockets, so a daemon that comes or goes is seen at once. The
//! rules (merging, applying events, picking an endpoint, expiry) are the plain
//! functions of [`Directory`], unit-tested below.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use paddock_config::ClusterConfig;
use paddock_wire::kinds::{self, Service, ServiceList, ServiceState};
use paddock_wire::{ClientError, Envelope, Pending};
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};

/// How long a registry listing is trusted before `find` asks again (events keep it
/// current in between).
pub const DISCOVERY_TTL: Duration = Duration::from_secs(2);
/// A listing without the daemon asked for is asked for again once it is this old.
pub const MISS_REFRESH: Duration = Duration::from_millis(250);

/// How long each heartbeat gets to answer `registry.list`.
pub const REGISTRY_TIMEOUT: Duration = Duration::from_secs(1);

/// The timeout of `call_daemon`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum FindError {
    #[error("{config} lists no heartbeat to ask: add [cluster] registries = [\"tcp://…\"] or a [daemons.heartbeat] table")]
    NoRegistry { config: String },
    #[error("no heartbeat answered registry.list ({}): are the heartbeats running?", errors.join("; "))]
    Registry { errors: Vec<String> },
    #[error("no alive {daemon} in the registry: is paddock-{daemon} running and beating?")]
    NoneAlive { daemon: String },
}

/// Why `call_daemon` failed: finding the daemon, or the call itself.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error(transparent)]
    Find(#[from] FindError),
    #[error(transparent)]
    Call(#[from] ClientError),
}

/// The registry as this daemon last saw it.
#[derive(Debug, Default)]
pub struct Directory {
    services: Vec<Service>,
    fetched: Option<Instant>,
}

/// One registry entry's identity: the same incarnation listed by two heartbeats is
/// one service.
fn key(s: &Service) -> (&str, &str, &str) {
    (&s.daemon, &s.node, &s.incarnation)
}

impl Directory {
    /// Whether a listing fetched at `fetched` may still be used at `now`.
    pub fn is_fresh(fetched: Option<Instant>, now: Instant, ttl: Duration) -> bool {
        fetched.is_some_and(|t| now.saturating_duration_since(t) < ttl)
    }

    pub fn fresh(&self, now: Instant, ttl: Duration) -> bool {
        Self::is_fresh(self.fetched, now, ttl)
    }

    /// Whether anything was ever listed (a stale listing beats none).
    pub fn has_listing(&self) -> bool {
        self.fetched.is_some()
    }

    /// Replaces the view with the heartbeats' listings, merged: one entry per
    /// incarnation, the most recently seen copy winning.
    pub fn replace(&mut self, listings: Vec<Vec<Service>>, now: Instant) {
        self.services = merge(listings);
        self.fetched = Some(now);
    }

    /// Keeps the old view for another TTL (no heartbeat answered).
    pub fn keep(&mut self, now: Instant) {
        self.fetched = Some(now);
    }

    /// A `registry.up` or `registry.down` event: that incarnation's entry as it now is.
    pub fn apply(&mut self, service: Service) {
        match self.services.iter_mut().find(|s| key(s) == key(&service)) {
            Some(s) => *s = service,
            None => self.services.push(service),
        }
    }

    /// The rpc endpoints of `daemon`'s alive incarnations, best first: this node's
    /// own, then the most recently seen; each endpoint once.
    pub fn find(&self, daemon: &str, node: &str) -> Vec<String> {
        pick(&self.services, daemon, node)
    }

    /// `daemon`'s alive incarnations with all their endpoints, this node's first.
    pub fn alive(&self, daemon: &str, node: &str) -> Vec<Service> {
        let mut v: Vec<Service> = self
            .services
            .iter()
            .filter(|s| s.daemon == daemon && s.state == ServiceState::Alive)
            .cloned()
            .collect();
        v.sort_by(|a, b| {
            (b.node == node)
                .cmp(&(a.node == node))
                .then(a.node.cmp(&b.node))
        });
        v
    }

    /// Every heartbeat's PUB endpoint the registry knows of.
    pub fn publishers(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .services
            .iter()
            .filter(|s| s.daemon == "heartbeat" && s.state != ServiceState::Dead)
            .filter_map(|s| s.endpoints.get("pub").cloned())
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

/// Several heartbeats' listings as one: an incarnation listed more than once keeps
/// its most recently seen copy.
pub fn merge(listings: Vec<Vec<Service>>) -> Vec<Service> {
    let mut by_key: HashMap<(String, String, String), Service> = HashMap::new();
    for s in listings.into_iter().flatten() {
        let k = (s.daemon.clone(), s.node.clone(), s.incarnation.clone());
        match by_key.get(&k) {
            Some(old) if old.last_seen >= s.last_seen => {}
            _ => {
                by_key.insert(k, s);
            }
        }
    }
    let mut out: Vec<Service> = by_key.into_values().collect();
    out.sort_by(|a, b| key(a).cmp(&key(b)));
    out
}

/// Which endpoints to try for `daemon`, best first: alive incarnations only, this
/// node's before others, then the most recently seen; an endpoint once.
pub fn pick(services: &[Service], daemon: &str, node: &str) -> Vec<String> {
    let mut alive: Vec<&Service> = services
        .iter()
        .filter(|s| s.daemon == daemon && s.state == ServiceState::Alive)
        .filter(|s| s.endpoints.contains_key("rpc"))
        .collect();
    alive.sort_by(|a, b| {
        (b.node == node)
            .cmp(&(a.node == node))
            .then(b.last_seen.cmp(&a.last_seen))
            .then(a.node.cmp(&b.node))
    });
    let mut out: Vec<String> = Vec::new();
    for s in alive {
        let ep = &s.endpoints["rpc"];
        if !out.contains(ep) {
            out.push(ep.clone());
        }
    }
    out
}

/// A daemon's outgoing client with discovery. Cheap to clone.
#[derive(Clone)]
pub struct Calls {
    wire: paddock_wire::Calls,
    config: watch::Receiver<Arc<ClusterConfig>>,
    directory: Arc<Mutex<Directory>>,
    /// Heartbeat PUB endpoints whose registry events are being followed.
    watching: Arc<Mutex<BTreeSet<String>>>,
    /// One refresh at a time: finds that arrive meanwhile wait for its listing
    /// instead of asking the heartbeats again.
    refreshing: Arc<tokio::sync::Mutex<()>>,
}

impl Calls {
    pub(crate) fn new(
        wire: paddock_wire::Calls,
        config: watch::Receiver<Arc<ClusterConfig>>,
    ) -> Calls {
        Calls {
            wire,
            config,
            directory: Arc::new(Mutex::new(Directory::default())),
            watching: Arc::new(Mutex::new(BTreeSet::new())),
            refreshing: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    /// The wire client underneath (for `call_with`, `subscribe_into`, counters).
    pub fn wire(&self) -> &paddock_wire::Calls {
        &self.wire
    }

    /// Calls `kind` on the rpc endpoint `endpoint` (see [`paddock_wire::Calls::call`]).
    pub fn call(&self, endpoint: &str, kind: &str, body: Value, timeout: Duration) -> Pending {
        self.wire.call(endpoint, kind, body, timeout)
    }

    /// Events of `endpoint`'s PUB socket whose kind starts with `prefix`.
    pub fn subscribe(
        &self,
        endpoint: &str,
        prefix: &str,
    ) -> Result<mpsc::Receiver<Envelope>, ClientError> {
        self.wire.subscribe(endpoint, prefix)
    }

    /// `daemon`'s alive incarnations as the registry lists them (every endpoint
    /// each beats, e.g. `pub`), this node's first; empty when none is alive.
    pub async fn services(&self, daemon: &str) -> Result<Vec<Service>, FindError> {
        self.fresh_enough(daemon).await?;
        let node = self.config.borrow().node().to_string();
        Ok(self.dir().alive(daemon, &node))
    }

    /// Refreshes the listing when it is older than [`DISCOVERY_TTL`], or older
    /// than [`MISS_REFRESH`] and without an alive `daemon`: a daemon that has
    /// just started (and whose `registry.up` this one may have missed) is not
    /// reported missing for a whole TTL.
    async fn fresh_enough(&self, daemon: &str) -> Result<(), FindError> {
        let node = self.config.borrow().node().to_string();
        let stale = |me: &Self| {
            let d = me.dir();
            let now = Instant::now();
            !d.fresh(now, DISCOVERY_TTL)
                || (!d.fresh(now, MISS_REFRESH) && d.alive(daemon, &node).is_empty())
        };
        if stale(self) {
            let _one = self.refreshing.lock().await;
            if stale(self) {
                self.refresh().await?;
            }
        }
        Ok(())
    }

    /// [`Calls::services`] from a listing asked for now, not the cached one: for a
    /// decision that a peer missing from a listing up to [`DISCOVERY_TTL`] old
    /// would make wrongly (a blobstore deciding it has no pair to copy to).
    pub async fn services_now(&self, daemon: &str) -> Result<Vec<Service>, FindError> {
        {
            let _one = self.refreshing.lock().await;
            self.refresh().await?;
        }
        let node = self.config.borrow().node().to_string();
        Ok(self.dir().alive(daemon, &node))
    }

    /// The rpc endpoints of `daemon`'s alive incarnations, this node's first.
    pub async fn find(&self, daemon: &str) -> Result<Vec<String>, FindError> {
        self.fresh_enough(daemon).await?;
        let node = self.config.borrow().node().to_string();
        let found = self.dir().find(daemon, &node);
        if found.is_empty() {
            return Err(FindError::NoneAlive {
                daemon: daemon.to_string(),
            });
        }
        Ok(found)
    }

    /// Finds `daemon` and calls `kind` on its best endpoint (this node's own when it
    /// is alive), with [`DEFAULT_TIMEOUT`]. The call is not repeated on another
    /// incarnation: a timed-out request may have been acted on.
    pub async fn call_daemon(
        &self,
        daemon: &str,
        kind: &str,
        body: Value,
    ) -> Result<Value, CallError> {
        self.call_daemon_timeout(daemon, kind, body, DEFAULT_TIMEOUT)
            .await
    }

    /// [`Calls::call_daemon`] with a timeout for the call (finding takes at most
    /// [`REGISTRY_TIMEOUT`] more).
    pub async fn call_daemon_timeout(
        &self,
        daemon: &str,
        kind: &str,
        body: Value,
        timeout: Duration,
    ) -> Result<Value, CallError> {
        let endpoints = self.find(daemon).await?;
        Ok(self.call(&endpoints[0], kind, body, timeout).await?)
    }

    fn dir(&self) -> std::sync::MutexGuard<'_, Directory> {
        self.directory.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks every configured heartbeat at once and merges what they say. When none
    /// answers, an earlier listing is kept for another TTL (better stale than blind).
    async fn refresh(&self) -> Result<(), FindError> {
        let cfg = self.config.borrow().clone();
        let registries = cfg.registries();
        if registries.is_empty() {
            return Err(FindError::NoRegistry {
                config: cfg.path.display().to_string(),
            });
        }
        // Queued together, so the heartbeats are asked concurrently.
        let pending: Vec<(String, Pending)> = registries
            .iter()
            .map(|ep| {
                let p = self
                    .wire
                    .call(ep, kinds::REGISTRY_LIST, json!({}), REGISTRY_TIMEOUT);
                (ep.clone(), p)
            })
            .collect();
        let mut listings = Vec::new();
        let mut errors = Vec::new();
        for (ep, p) in pending {
            match p.await.map(serde_json::from_value::<ServiceList>) {
                Ok(Ok(list)) => listings.push(list.services),
                Ok(Err(e)) => errors.push(format!("{ep}: bad registry.list reply: {e}")),
                Err(e) => errors.push(format!("{ep}: {e}")),
            }
        }
        let now = Instant::now();
        if listings.is_empty() {
            let mut dir = self.dir();
            if dir.has_listing() {
                tracing::warn!(
                    "no heartbeat answered registry.list ({}); using the last listing",
                    errors.join("; ")
                );
                dir.keep(now);
                return Ok(());
            }
            return Err(FindError::Registry { errors });
        }
        let publishers = {
            let mut dir = self.dir();
            dir.replace(listings, now);
            dir.publishers()
        };
        self.follow(publishers);
        Ok(())
    }

    /// Follows registry events of heartbeats not followed yet.
    fn follow(&self, publishers: Vec<String>) {
        for ep in publishers {
            if !self
                .watching
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(ep.clone())
            {
                continue;
            }
            let mut rx = match self.wire.subscribe(&ep, "registry.") {
                Ok(rx) => rx,
                Err(e) => {
                    tracing::warn!(endpoint = ?ep, "cannot follow registry events: {e}");
                    self.unwatch(&ep);
                    continue;
                }
            };
            let this = self.clone();
            actix_rt::spawn(async move {
                while let Some(ev) = rx.recv().await {
                    if ev.kind != kinds::REGISTRY_UP && ev.kind != kinds::REGISTRY_DOWN {
                        continue;
                    }
                    match serde_json::from_value::<Service>(ev.body) {
                        Ok(s) => this.dir().apply(s),
                        Err(e) => tracing::debug!("ignored a registry event: {e}"),
                    }
                }
                this.unwatch(&ep);
            });
        }
    }

    fn unwatch(&self, ep: &str) {
        self.watching
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(ep);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn svc(daemon: &str, node: &str, inc: &str, state: ServiceState, seen: i64) -> Service {
        let mut endpoints = BTreeMap::new();
        endpoints.insert("rpc".into(), format!("tcp://{node}:{inc}"));
        Service {
            daemon: daemon.into(),
            node: node.into(),
            incarnation: inc.into(),
            endpoints,
            state,
            last_seen: seen,
            interval_ms: 1000,
        }
    }

    use ServiceState::{Alive, Dead, Suspect};

    #[test]
    fn pick_prefers_this_node_then_the_newest_alive() {
        let list = vec![
            svc("locker", "b", "1", Alive, 300),
            svc("locker", "a", "2", Alive, 100),
            svc("locker", "c", "3", Alive, 200),
            svc("locker", "d", "4", Suspect, 400),
            svc("locker", "e", "5", Dead, 500),
            svc("api", "a", "6", Alive, 900),
        ];
        assert_eq!(
            pick(&list, "locker", "a"),
            ["tcp://a:2", "tcp://b:1", "tcp://c:3"]
        );
        assert_eq!(
            pick(&list, "locker", "z"),
            ["tcp://b:1", "tcp://c:3", "tcp://a:2"]
        );
        assert!(pick(&list, "gitserver", "a").is_empty());
    }

    #[test]
    fn pick_lists_an_endpoint_once_and_skips_entries_without_rpc() {
        let mut restarted = svc("locker", "a", "new", Alive, 200);
        restarted
            .endpoints
            .insert("rpc".into(), "tcp://a:old".into());
        let mut no_rpc = svc("locker", "b", "x", Alive, 900);
        no_rpc.endpoints.clear();
        let list = vec![svc("locker", "a", "old", Alive, 100), restarted, no_rpc];
        assert_eq!(pick(&list, "locker", "a"), ["tcp://a:old"]);
    }

    #[test]
    fn merge_keeps_one_entry_per_incarnation_the_most_recently_seen() {
        let from_hb1 = vec![
            svc("locker", "a", "1", Suspect, 100),
            svc("api", "b", "2", Alive, 50),
        ];
        let from_hb2 = vec![
            svc("locker", "a", "1", Alive, 150),
            svc("locker", "a", "3", Alive, 10),
        ];
        let merged = merge(vec![from_hb1, from_hb2]);
        assert_eq!(merged.len(), 3);
        let l1 = merged.iter().find(|s| s.incarnation == "1").unwrap();
        assert_eq!((l1.state, l1.last_seen), (Alive, 150));
    }

    #[test]
    fn events_update_the_view_in_arrival_order() {
        let mut d = Directory::default();
        d.replace(
            vec![vec![svc("locker", "a", "1", Alive, 100)]],
            Instant::now(),
        );
        // A down event for the same incarnation (same last_seen) takes it out.
        d.apply(svc("locker", "a", "1", Suspect, 100));
        assert!(d.find("locker", "a").is_empty());
        // A new incarnation coming up is found before the next listing.
        d.apply(svc("locker", "b", "2", Alive, 200));
        assert_eq!(d.find("locker", "a"), ["tcp://b:2"]);
        d.apply(svc("locker", "a", "1", Alive, 300));
        assert_eq!(d.find("locker", "a"), ["tcp://a:1", "tcp://b:2"]);
    }

    #[test]
    fn a_listing_expires_after_the_ttl() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(2);
        assert!(!Directory::is_fresh(None, t0, ttl));
        assert!(Directory::is_fresh(Some(t0), t0, ttl));
        assert!(Directory::is_fresh(
            Some(t0),
            t0 + Duration::from_millis(1999),
            ttl
        ));
        assert!(!Directory::is_fresh(Some(t0), t0 + ttl, ttl));
        // A clock read before the fetch (another thread) is not "expired".
        assert!(Directory::is_fresh(
            Some(t0 + Duration::from_secs(1)),
            t0,
            ttl
        ));
        let mut d = Directory::default();
        assert!(!d.fresh(t0, ttl) && !d.has_listing());
        d.keep(t0);
        assert!(d.fresh(t0, ttl) && d.has_listing());
    }

    #[test]
    fn publishers_are_the_live_heartbeats_pub_endpoints() {
        let mut hb1 = svc("heartbeat", "a", "1", Alive, 1);
        hb1.endpoints.insert("pub".into(), "tcp://a:pub".into());
        let mut hb2 = svc("heartbeat", "b", "2", Dead, 1);
        hb2.endpoints.insert("pub".into(), "tcp://b:pub".into());
        let mut hb3 = svc("heartbeat", "a", "3", Suspect, 2);
        hb3.endpoints.insert("pub".into(), "tcp://a:pub".into());
        let mut d = Directory::default();
        d.replace(
            vec![vec![hb1, hb2, hb3, svc("locker", "a", "4", Alive, 1)]],
            Instant::now(),
        );
        assert_eq!(d.publishers(), ["tcp://a:pub"]);
    }
}
