//! The scheduler's thin actor: one loop that holds the `scheduler` lease, re-reads
//! the world (the api's desired state, every runner's instances and offer, the
//! heartbeat registry) on every hint and every `resync`, feeds the pure core
//! (`deploy`, `reconcile`) and turns its effects into calls. It trusts no memory
//! of its own about the cluster but the running deploys, their timers and the
//! drains it began; a new leader resumes from what runs.
//!
//! Events (the api's `app.changed`, the runners' `instance.*`, the balancers'
//! `backend.drained`) are hints that wake the loop early; the deploys' events are
//! derived from the difference between what a deploy knows and what the runners
//! now list, so a lost event costs a resync period, never correctness.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::time::{Duration, Instant};

use paddock_daemon::Ctx;
use paddock_wire::kinds::{Service, ServiceState};
use paddock_wire::{Code, Envelope};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::deploy::{self, Deploy, Event, Outcome, Rollout, Target, Timer, World};
use crate::model::{
    DesiredApp, Formation, HealthCheck, Instance, InstanceId, InstanceState, Liveness, Node,
    NodeId, Owner, Registry, Release, Scale, Token,
};
use crate::placement::Room;
use crate::reconcile::{self, Input};
use crate::routes::RouteTable;
use crate::settings::Settings;

/// The lease every scheduler competes for.
pub const LEASE: &str = "scheduler";
/// How long a runner's `instance.list` and `runner.info` may take in a pass
/// (a live runner answers in milliseconds).
const LIST_TIMEOUT: Duration = Duration::from_millis(750);
/// The same for a runner not listed yet.
const FIRST_LIST_TIMEOUT: Duration = Duration::from_secs(3);
/// Audit entries waiting to be sent, at most.
const AUDIT_QUEUE: usize = 4096;

/// What the rpc handlers read: whether this one leads, and its last table.
#[derive(Debug, Default)]
pub struct Shared {
    pub token: Option<Token>,
    pub table: Option<Value>,
    pub deploys: Vec<Value>,
    /// The last pass's world, for `formation.check` (the leader's only).
    pub world: Option<(Registry, Vec<Instance>, Instant)>,
    /// Each app's current release version and process types, as the last pass read them.
    pub current: BTreeMap<String, (u64, Vec<String>)>,
    /// `app.restart` requests (app, process type or all) for the next pass.
    pub restarts: Vec<(String, Option<String>)>,
    /// Wakes the loop for a request.
    pub wake: Rc<tokio::sync::Notify>,
}

struct Lease {
    token: Token,
    /// When the grant runs out, by our clock (from before the request was sent).
    expires: Instant,
    renew_at: Instant,
}

/// A runner node as the registry and its runner say.
#[derive(Debug, Clone)]
struct RunnerNode {
    liveness: Liveness,
    rpc: Option<String>,
}

pub struct Scheduler {
    ctx: Ctx,
    s: Settings,
    shared: Rc<RefCell<Shared>>,
    owner: String,
    lease: Option<Lease>,
    deploys: BTreeMap<String, Deploy>,
    /// (app, version) whose deploy failed: not begun again.
    failed: BTreeSet<(String, u64)>,
    /// Apps whose running deploy is a restart (`app.restart`) of their
    /// current release: its failure marks nothing failed.
    restarting: BTreeSet<String>,
    /// The audit log's queue (one sender, drained in order by one task).
    audit_tx: Option<mpsc::Sender<Value>>,
    /// (app, version) reported succeeded to the api.
    live: BTreeSet<(String, u64)>,
    draining: BTreeMap<InstanceId, Instant>,
    /// Each app's last alert: the failed release's status message.
    reasons: BTreeMap<String, String>,
    /// Each app's rollback target while its deploy rolls back.
    rollback_to: BTreeMap<String, u64>,
    shortfalls: BTreeSet<String>,
    /// (app, proc) whose last start failed: not tried again before `until`.
    start_backoff: BTreeMap<(String, String), StartBackoff>,
    /// Starts sent and not yet in a listing of their node read after their
    /// reply: counted as starting.
    inflight: BTreeMap<InstanceId, Instance>,
    /// Of those, the ones whose reply has come.
    replied: BTreeSet<InstanceId>,
    /// Each runner node's last offer (kept while it cannot be asked).
    offers: BTreeMap<NodeId, u64>,
    started_tx: mpsc::UnboundedSender<Started>,
    started_rx: mpsc::UnboundedReceiver<Started>,
    timers: Vec<(Instant, String, Timer)>,
    alive_since: BTreeMap<NodeId, Instant>,
    /// Each runner node's last listing (kept while it cannot be asked).
    known: BTreeMap<NodeId, Vec<Instance>>,
    seen_ids: BTreeSet<InstanceId>,
    releases: BTreeMap<(String, u64), Release>,
    /// (app, process type) → `stop_after_disconnect` in ms, from the api.
    stop_after: BTreeMap<(String, String), u64>,
    subscribed: BTreeSet<String>,
    tx: mpsc::Sender<Envelope>,
    rx: mpsc::Receiver<Envelope>,
    confirmed: Vec<InstanceId>,
    last_publish: Option<(Instant, Value)>,
    first_tick: bool,
}

/// The reply to a start sent in the background.
struct Started {
    what: String,
    id: InstanceId,
    key: (String, String),
    result: Result<Value, paddock_wire::ClientError>,
}

struct StartBackoff {
    until: Instant,
    failures: u32,
    /// The last failure said, so the same one is not said every pass.
    last: String,
}

/// Why a tick stopped early.
enum Stop {
    /// A runner or the locker said a newer scheduler leads.
    Deposed(String),
    Skip(String),
}

impl Scheduler {
    pub fn new(ctx: Ctx, s: Settings, shared: Rc<RefCell<Shared>>) -> Scheduler {
        let (tx, rx) = mpsc::channel(1024);
        let (started_tx, started_rx) = mpsc::unbounded_channel();
        let owner = format!("{}/{}", ctx.identity(), ctx.incarnation);
        Scheduler {
            ctx,
            s,
            shared,
            owner,
            lease: None,
            deploys: BTreeMap::new(),
            failed: BTreeSet::new(),
            restarting: BTreeSet::new(),
            audit_tx: None,
            live: BTreeSet::new(),
            draining: BTreeMap::new(),
            reasons: BTreeMap::new(),
            rollback_to: BTreeMap::new(),
            shortfalls: BTreeSet::new(),
            start_backoff: BTreeMap::new(),
            inflight: BTreeMap::new(),
            replied: BTreeSet::new(),
            offers: BTreeMap::new(),
            started_tx,
            started_rx,
            timers: Vec::new(),
            alive_since: BTreeMap::new(),
            known: BTreeMap::new(),
            seen_ids: BTreeSet::new(),
            releases: BTreeMap::new(),
            stop_after: BTreeMap::new(),
            subscribed: BTreeSet::new(),
            tx,
            rx,
            confirmed: Vec::new(),
            last_publish: None,
            first_tick: true,
        }
    }

    pub async fn run(mut self) -> anyhow::Result<()> {
        loop {
            if self.lease.is_none() {
                self.acquire().await;
                continue;
            }
            let now = Instant::now();
            if self.lease.as_ref().is_some_and(|l| now >= l.renew_at) {
                self.renew().await;
            }
            if self.leads() {
                match self.tick().await {
                    Ok(()) => {}
                    Err(Stop::Deposed(why)) => self.lose(&why),
                    Err(Stop::Skip(why)) => tracing::warn!("scheduling pass skipped: {why}"),
                }
            }
            self.wait().await;
        }
    }

    fn leads(&self) -> bool {
        self.lease
            .as_ref()
            .is_some_and(|l| Instant::now() < l.expires)
    }

    /// Sleeps until an event, a timer, the lease's renewal or the resync.
    async fn wait(&mut self) {
        let now = Instant::now();
        let mut next = now + self.s.resync;
        if let Some(l) = &self.lease {
            next = next.min(l.renew_at);
        }
        if let Some(t) = self.timers.iter().map(|(at, _, _)| *at).min() {
            next = next.min(t);
        }
        let sleep = next.saturating_duration_since(now);
        let wake = self.shared.borrow().wake.clone();
        tokio::select! {
            ev = self.rx.recv() => {
                if let Some(ev) = ev { self.note(ev); }
                // Take what else has come, so a burst is one pass.
                tokio::time::sleep(Duration::from_millis(20)).await;
                while let Ok(ev) = self.rx.try_recv() { self.note(ev); }
            }
            _ = tokio::time::sleep(sleep) => {}
            _ = wake.notified() => {}
        }
    }

    fn note(&mut self, ev: Envelope) {
        if ev.kind == "backend.drained" {
            if let Some(id) = ev.body["id"].as_str() {
                self.confirmed.push(id.to_string());
            }
        }
    }

    async fn acquire(&mut self) {
        let ttl = self.s.lease_ttl;
        let wait = ttl.min(Duration::from_secs(5));
        let sent = Instant::now();
        let r = self
            .ctx
            .calls()
            .call_daemon_timeout(
                "locker",
                "lock.acquire",
                json!({"name": LEASE, "owner": self.owner, "ttl_ms": ttl.as_millis() as u64,
                       "wait_ms": wait.as_millis() as u64}),
                wait + Duration::from_secs(5),
            )
            .await;
        match r {
            Ok(v) => {
                let Some(token) = v["token"].as_u64() else {
                    tracing::warn!("the locker's grant had no token: {v}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    return;
                };
                tracing::info!(token, "leading the scheduling: lease `{LEASE}` taken");
                self.lease = Some(Lease {
                    token,
                    expires: sent + ttl,
                    renew_at: sent + ttl / 3,
                });
                self.deploys.clear();
                self.timers.clear();
                self.draining.clear();
                self.confirmed.clear();
                self.last_publish = None;
                self.first_tick = true;
                self.shared.borrow_mut().token = Some(token);
            }
            Err(e) if code_of(&e) == Some(&Code::Held) => {}
            Err(e) => {
                tracing::debug!(
                    "cannot take lease `{LEASE}` yet: {}",
                    paddock_daemon::chain(&e)
                );
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        // Followers drop the hints meanwhile.
        while self.rx.try_recv().is_ok() {}
    }

    async fn renew(&mut self) {
        let Some(l) = &self.lease else { return };
        let (token, ttl) = (l.token, self.s.lease_ttl);
        let sent = Instant::now();
        let r = self
            .ctx
            .calls()
            .call_daemon_timeout(
                "locker",
                "lock.renew",
                json!({"name": LEASE, "token": token, "ttl_ms": ttl.as_millis() as u64}),
                ttl / 3,
            )
            .await;
        match r {
            Ok(_) => {
                if let Some(l) = &mut self.lease {
                    l.expires = sent + ttl;
                    l.renew_at = sent + ttl / 3;
                }
            }
            Err(e) if code_of(&e) == Some(&Code::StaleToken) => {
                self.lose("the locker says the lease is no longer ours")
            }
            Err(e) => {
                let why = paddock_daemon::chain(&e);
                if self.leads() {
                    tracing::warn!("renewing lease `{LEASE}` failed (retrying): {why}");
                    if let Some(l) = &mut self.lease {
                        l.renew_at = Instant::now() + Duration::from_millis(200);
                    }
                } else {
                    self.lose(&format!("it expired while it could not be renewed: {why}"));
                }
            }
        }
    }

    fn lose(&mut self, why: &str) {
        if let Some(l) = self.lease.take() {
            tracing::warn!(
                token = l.token,
                "no longer leading the scheduling ({why}); acting on nothing until the lease is ours again"
            );
        }
        self.deploys.clear();
        self.restarting.clear();
        self.timers.clear();
        self.draining.clear();
        self.rollback_to.clear();
        self.inflight.clear();
        self.replied.clear();
        let mut sh = self.shared.borrow_mut();
        sh.token = None;
        sh.table = None;
        sh.deploys.clear();
        sh.world = None;
        sh.restarts.clear();
    }

    fn token(&self) -> Token {
        self.lease.as_ref().map_or(0, |l| l.token)
    }

    fn subscribe(&mut self, endpoint: &str, prefix: &str) {
        let key = format!("{endpoint} {prefix}");
        if self.subscribed.contains(&key) {
            return;
        }
        match self.ctx.calls().subscribe(endpoint, prefix) {
            Ok(mut rx) => {
                self.subscribed.insert(key);
                let tx = self.tx.clone();
                tokio::task::spawn_local(async move {
                    while let Some(ev) = rx.recv().await {
                        // Hints only: when the loop is behind, one more is no news.
                        let _ = tx.try_send(ev);
                    }
                });
            }
            Err(e) => tracing::warn!(
                "cannot subscribe to {endpoint} ({prefix}): {}",
                paddock_daemon::chain(&e)
            ),
        }
    }

    /// The registry as every configured heartbeat says, merged.
    async fn registry(&self) -> Result<Vec<Service>, Stop> {
        let cfg = self.ctx.config();
        let mut listings = Vec::new();
        let mut errors = Vec::new();
        for ep in cfg.registries() {
            let r = self
                .ctx
                .calls()
                .call(&ep, "registry.list", json!({}), Duration::from_secs(1))
                .await;
            match r.map(|v| serde_json::from_value::<Vec<Service>>(v["services"].clone())) {
                Ok(Ok(list)) => listings.push(list),
                Ok(Err(e)) => errors.push(format!("{ep}: {e}")),
                Err(e) => errors.push(format!("{ep}: {}", paddock_daemon::chain(&e))),
            }
        }
        if listings.is_empty() {
            return Err(Stop::Skip(format!(
                "no heartbeat answered registry.list ({})",
                errors.join("; ")
            )));
        }
        Ok(paddock_daemon::calls::merge(listings))
    }

    async fn tick(&mut self) -> Result<(), Stop> {
        let services = self.registry().await?;
        for s in &services {
            if s.state == ServiceState::Dead {
                continue;
            }
            let Some(publish) = s.endpoints.get("pub") else {
                continue;
            };
            match s.daemon.as_str() {
                "api" => self.subscribe(&publish.clone(), "app.changed"),
                "runner" => self.subscribe(&publish.clone(), "instance."),
                "balancer" => self.subscribe(&publish.clone(), "backend.drained"),
                // A node declared dead (or back) is acted on at once, not at
                // the next resync.
                "heartbeat" => self.subscribe(&publish.clone(), "registry."),
                _ => {}
            }
        }
        let runners = runner_nodes(&services);
        let now = Instant::now();
        let now_ms = paddock_wire::envelope::now_ms();

        // The replies to starts that came before the runners are asked: such an
        // instance is in its runner's listing. One whose reply comes while the
        // runners answer stays in flight (counted as starting) until the next
        // pass; taken now, a listing sent before its runner made it would say
        // it is gone, and the deploy would start another.
        self.started(now).map_err(Stop::Deposed)?;
        // Ask every runner not dead, all at once.
        let mut asks = Vec::new();
        for (node, r) in &runners {
            if r.liveness == Liveness::Dead {
                continue;
            }
            let Some(rpc) = r.rpc.clone() else { continue };
            let calls = self.ctx.calls().clone();
            let node = node.clone();
            // With the token: the runner counts it as the scheduler's contact
            // (`stop_after_disconnect`).
            let list_body = json!({"token": self.token()});
            // Short: a runner that just died (or was cut off) holds up the
            // whole pass, and with it the re-placement of what it ran; a
            // listing that does not come is replaced by its last one. A runner
            // never listed has no last one (nothing is placed until it is):
            // it gets longer, so a busy machine does not stall placement.
            let t = if self.known.contains_key(&node) {
                LIST_TIMEOUT
            } else {
                FIRST_LIST_TIMEOUT
            };
            asks.push(tokio::task::spawn_local(async move {
                let (list, info) = tokio::join!(
                    calls.call(&rpc, "instance.list", list_body, t),
                    calls.call(&rpc, "runner.info", json!({}), t)
                );
                (node, list, info)
            }));
        }
        let mut listed: BTreeSet<NodeId> = BTreeSet::new();
        for a in asks {
            let Ok((node, list, info)) = a.await else {
                continue;
            };
            match list {
                Ok(v) => {
                    let items = v["instances"].as_array().cloned().unwrap_or_default();
                    let list: Vec<Instance> = items
                        .iter()
                        .filter_map(|i| instance_of(i, &node, now, now_ms))
                        .collect();
                    self.seen_ids.extend(list.iter().map(|i| i.id.clone()));
                    self.known.insert(node.clone(), list);
                    listed.insert(node.clone());
                }
                Err(e) => tracing::warn!(
                    node,
                    "instance.list failed: {}; using its last listing",
                    paddock_daemon::chain(&e)
                ),
            }
            match info {
                Ok(v) => {
                    let offer = v["offer_memory_mb"].as_u64().unwrap_or(0);
                    self.offers.insert(node, offer);
                }
                Err(e) => tracing::debug!(
                    node,
                    "runner.info failed: {}; using its last offer",
                    paddock_daemon::chain(&e)
                ),
            }
        }
        // A start whose reply came before its node was listed is in that
        // listing (or is gone): no longer counted apart.
        let (replied, inflight) = (&mut self.replied, &mut self.inflight);
        inflight.retain(|id, rec| {
            let settled = replied.contains(id) && listed.contains(&rec.node);
            if settled {
                replied.remove(id);
            }
            !settled
        });
        self.replied.retain(|id| self.inflight.contains_key(id));
        // A runner alive but never listed (a new leader's first passes, or one
        // that does not answer): what it runs is unknown, so nothing is placed,
        // retired or begun this pass, or it would run twice.
        let blind: Vec<NodeId> = runners
            .iter()
            .filter(|(n, r)| r.liveness != Liveness::Dead && !self.known.contains_key(*n))
            .map(|(n, _)| n.clone())
            .collect();
        if !blind.is_empty() {
            tracing::info!(
                "not placing this pass: runner node(s) {} not listed yet",
                blind.join(", ")
            );
        }
        let offers = self.offers.clone();

        // The api is read after the runners are listed: an api (or database)
        // outage skips the pass but not the runners' contact, which
        // `stop_after_disconnect` counts.
        let apps = self.desired().await?;
        let registry = self.nodes(&runners, &offers, now);
        self.first_tick = false;
        let mut instances: Vec<Instance> = self.known.values().flatten().cloned().collect();
        // Starts still under way count as starting where not listed yet.
        for (id, rec) in &self.inflight {
            if !instances.iter().any(|i| &i.id == id) {
                instances.push(rec.clone());
            }
        }
        let ids: BTreeSet<&str> = instances.iter().map(|i| i.id.as_str()).collect();
        self.draining.retain(|id, _| {
            ids.contains(id.as_str()) && instances.iter().any(|i| &i.id == id && !i.state.is_gone())
        });

        let token = self.token();
        let policy = self.s.policy.clone();
        let mut world = World {
            token,
            room: Room::new(&registry, &instances, now, &policy),
            taken: self.seen_ids.clone(),
        };
        // Each effect with the version its deploy targeted when it was made
        // (a failing step retargets to the rollback's version at once).
        let mut fx: Vec<(String, u64, deploy::Effect)> = Vec::new();
        let desired: BTreeMap<&str, &DesiredApp> =
            apps.iter().map(|a| (a.name.as_str(), a)).collect();

        // Running deploys: what changed since they last looked, then timers.
        let confirmed = std::mem::take(&mut self.confirmed);
        let due: Vec<(String, Timer)> = {
            let (due, later): (Vec<_>, Vec<_>) =
                self.timers.drain(..).partition(|(at, _, _)| *at <= now);
            self.timers = later;
            due.into_iter().map(|(_, app, t)| (app, t)).collect()
        };
        let mut said: Vec<(String, u64, String)> = Vec::new();
        for (app, d) in self.deploys.iter_mut() {
            let mut events = events_for(d, &instances, &registry, &listed);
            for id in &confirmed {
                if d.instances().contains_key(id) {
                    events.push(Event::DrainConfirmed { id: id.clone() });
                }
            }
            for (a, t) in &due {
                if a == app {
                    events.push(Event::Timer(t.clone()));
                }
            }
            for ev in events {
                let before = d.target().version;
                if let Some(l) = event_line(d, &ev) {
                    said.push((app.clone(), before, l));
                }
                for e in d.step(ev, now, &policy, &mut world) {
                    // What failed is never taken up again (below, as a newer
                    // release, while its pending status is being changed).
                    match &e {
                        deploy::Effect::Rollback { .. } => {
                            self.failed.insert((app.clone(), before));
                        }
                        // A restart that failed leaves the release it
                        // restarted to reconcile, as before it.
                        deploy::Effect::Finished {
                            version,
                            outcome: Outcome::Failed | Outcome::RolledBack,
                        } if !self.restarting.contains(app) => {
                            self.failed.insert((app.clone(), *version));
                        }
                        _ => {}
                    }
                    fx.push((app.clone(), before, e));
                }
            }
            // A newer release takes over.
            if let Some(want) = desired.get(app.as_str()).and_then(|a| want_target(a)) {
                let newer = want.version > d.target().version
                    && !self.failed.contains(&(app.clone(), want.version));
                if newer && d.phase() != deploy::Phase::Done {
                    said.push((
                        app.clone(),
                        want.version,
                        format!(
                            "deploying v{} (it replaces the deploy of v{})",
                            want.version,
                            d.target().version
                        ),
                    ));
                    let v = want.version;
                    let ev = Event::Newer {
                        target: want,
                        restart: false,
                    };
                    for e in d.step(ev, now, &policy, &mut world) {
                        fx.push((app.clone(), v, e));
                    }
                }
            }
        }
        // Deploys to begin: restarts asked for, then new releases.
        {
            let mut sh = self.shared.borrow_mut();
            sh.world = Some((registry.clone(), instances.clone(), now));
            sh.current = apps
                .iter()
                .filter_map(|a| {
                    let r = a.release.as_ref()?;
                    Some((
                        a.name.clone(),
                        (r.version, a.formation.keys().cloned().collect()),
                    ))
                })
                .collect();
        }
        // Restarts wait while nothing may begin.
        let restarts = if blind.is_empty() {
            std::mem::take(&mut self.shared.borrow_mut().restarts)
        } else {
            Vec::new()
        };
        let mut restart_of: BTreeMap<String, Option<String>> = BTreeMap::new();
        for (app, proc) in restarts {
            restart_of.insert(app, proc);
        }
        for a in &apps {
            if self.deploys.contains_key(&a.name) || !blind.is_empty() {
                continue;
            }
            let restart = restart_of.remove(&a.name);
            let r = match &restart {
                Some(only) if a.pending.is_none() => restart_rollout(a, only.as_deref()),
                _ => self.rollout(a, &instances, &registry),
            };
            let Some(r) = r else {
                continue;
            };
            let only = restart.flatten().filter(|_| r.restart);
            let existing: Vec<Instance> = instances
                .iter()
                .filter(|i| i.app == a.name && i.owner == Owner::Scheduler)
                .filter(|i| liveness(&registry, &i.node) != Liveness::Dead)
                // A restart of one process type deploys that type alone.
                .filter(|i| only.as_ref().is_none_or(|p| &i.proc == p))
                .cloned()
                .collect();
            let line = match (&r.live, r.restart) {
                (_, true) => format!(
                    "restarting {} of v{}",
                    only.clone().unwrap_or_else(|| "every process".to_string()),
                    r.target.version
                ),
                (Some(l), false) => {
                    format!("deploying v{} (from v{})", r.target.version, l.version)
                }
                (None, false) => format!("deploying v{} (the first release)", r.target.version),
            };
            tracing::info!(app = a.name, "{line}");
            let shape: Vec<String> = r
                .target
                .formation
                .iter()
                .map(|(p, s)| format!("{p}={}", s.quantity))
                .collect();
            self.progress(
                &a.name,
                r.target.version,
                &format!("{line}: {}", shape.join(" ")),
            );
            if r.restart {
                self.restarting.insert(a.name.clone());
            }
            let v = r.target.version;
            let (d, effects) = Deploy::begin(r, &existing, now, &policy, &mut world);
            fx.extend(effects.into_iter().map(|e| (a.name.clone(), v, e)));
            self.deploys.insert(a.name.clone(), d);
        }

        for (app, version, line) in said {
            self.progress(&app, version, &line);
        }
        let mut stale = None;
        let mut starts = Vec::new();
        let mut stops = Vec::new();
        for (app, stepped, e) in fx {
            let version = match &e {
                deploy::Effect::Live { version } | deploy::Effect::Finished { version, .. } => {
                    *version
                }
                _ => stepped,
            };
            if let Some(line) = effect_line(&app, &e) {
                self.progress(&app, version, &line);
            }
            match e {
                deploy::Effect::StartInstance(s) => starts.push(s),
                deploy::Effect::StopInstance(s) => stops.push(s),
                deploy::Effect::DrainInstance { id } => {
                    self.draining.entry(id).or_insert(now);
                }
                deploy::Effect::PublishRoutes => {}
                deploy::Effect::After { delay, timer } => {
                    self.timers.push((now + delay, app, timer))
                }
                deploy::Effect::Rollback { to } => {
                    self.rollback_to.insert(app, to);
                }
                deploy::Effect::Alert { reason } => {
                    self.alert(&app, &reason);
                    self.reasons.insert(app, reason);
                }
                deploy::Effect::Live { version } => {
                    tracing::info!(app, "v{version} is live");
                    self.status(
                        &app,
                        version,
                        true,
                        None,
                        desired.get(app.as_str()).copied(),
                    )
                    .await;
                }
                deploy::Effect::Finished { version, outcome } => {
                    tracing::info!(app, "the deploy of v{version} ended: {outcome:?}");
                    let said = match outcome {
                        Outcome::Succeeded => "succeeded",
                        Outcome::Failed => "failed",
                        Outcome::RolledBack => "rolled_back",
                        Outcome::Cancelled => "cancelled",
                    };
                    self.audit(
                        &app,
                        "scheduler.deploy",
                        json!({"version": version, "outcome": said}),
                    );
                    let d = desired.get(app.as_str()).copied();
                    let message = match outcome {
                        Outcome::Failed | Outcome::RolledBack => self.reasons.get(&app).cloned(),
                        _ => None,
                    };
                    self.ctx.server().publish(
                        "deploy.done",
                        json!({"app": app, "version": version, "outcome": said,
                               "message": message}),
                    );
                    if matches!(outcome, Outcome::Succeeded | Outcome::Cancelled) {
                        self.restarting.remove(&app);
                    }
                    match outcome {
                        Outcome::Succeeded => self.status(&app, version, true, None, d).await,
                        Outcome::Cancelled => {
                            let m = "replaced by a newer release before it went live";
                            self.status(&app, version, false, Some(m), d).await
                        }
                        Outcome::Failed | Outcome::RolledBack => {
                            if !self.restarting.remove(&app) {
                                self.failed.insert((app.clone(), version));
                            }
                            let to = self.rollback_to.remove(&app);
                            let current = d.and_then(|a| a.release.as_ref()).map(|r| r.version);
                            let was_current = current == Some(version)
                                || self.live.contains(&(app.clone(), version));
                            if let (Some(to), Outcome::RolledBack, true) =
                                (to, outcome, was_current)
                            {
                                self.rollback(&app, to).await;
                            }
                            let m = match (self.reasons.remove(&app), outcome) {
                                (Some(r), _) => r,
                                (None, Outcome::RolledBack) => {
                                    "the deploy failed and was rolled back".to_string()
                                }
                                (None, _) => "the deploy failed".to_string(),
                            };
                            self.status(&app, version, false, Some(&m), d).await
                        }
                    }
                }
            }
        }
        self.deploys.retain(|_, d| d.phase() != deploy::Phase::Done);
        if let Err(why) = self
            .carry_out(starts, stops, &apps, &runners, &mut instances, now)
            .await
        {
            stale = Some(why);
        }
        if let Some(why) = stale {
            return Err(Stop::Deposed(why));
        }

        // Everything no deploy owns.
        let mut deploying: BTreeSet<String> = self.deploys.keys().cloned().collect();
        // An app whose current release failed its deploy is left as it is (what
        // serves keeps serving) until the api has another current release:
        // reconcile would replace what serves with the failed release.
        for a in &apps {
            let held = a
                .release
                .as_ref()
                .is_some_and(|r| self.failed.contains(&(a.name.clone(), r.version)));
            if held {
                deploying.insert(a.name.clone());
            }
        }
        let mut draining = self.draining.clone();
        for d in self.deploys.values() {
            for id in d.draining() {
                draining.entry(id).or_insert(now);
            }
        }
        let plan = reconcile::reconcile(
            &Input {
                apps: &apps,
                instances: &instances,
                registry: &registry,
                draining: &draining,
                deploying: &deploying,
                token,
            },
            now,
            &policy,
        );
        // Said once, not every pass.
        let shortfalls: BTreeSet<String> = plan.shortfalls.iter().map(|s| s.to_string()).collect();
        for s in shortfalls.difference(&self.shortfalls) {
            tracing::warn!("{s}");
        }
        self.shortfalls = shortfalls;
        let mut starts = Vec::new();
        let mut stops = Vec::new();
        let mut table = None;
        for e in plan.effects {
            match e {
                reconcile::Effect::StartInstance(_)
                | reconcile::Effect::StopInstance(_)
                | reconcile::Effect::DrainInstance { .. }
                    if !blind.is_empty() => {}
                reconcile::Effect::StartInstance(s) => starts.push(s),
                reconcile::Effect::StopInstance(s) => stops.push(s),
                reconcile::Effect::DrainInstance { id } => {
                    self.draining.entry(id).or_insert(now);
                }
                reconcile::Effect::PublishRoutes(t) => table = Some(t),
            }
        }
        self.carry_out(starts, stops, &apps, &runners, &mut instances, now)
            .await
            .map_err(Stop::Deposed)?;
        if let Some(t) = table {
            self.publish(table_json(&t), now);
        }
        self.shared.borrow_mut().deploys = self
            .deploys
            .iter()
            .map(|(app, d)| {
                json!({"app": app, "version": d.target().version,
                       "phase": format!("{:?}", d.phase()).to_lowercase()})
            })
            .collect();
        Ok(())
    }

    /// The deploy an app needs: its pending release's, or its current
    /// release's when scheduler instances of another version still run.
    fn rollout(
        &self,
        a: &DesiredApp,
        instances: &[Instance],
        registry: &Registry,
    ) -> Option<Rollout> {
        if let Some(p) = &a.pending {
            if self.failed.contains(&(a.name.clone(), p.version)) {
                return None;
            }
            return deploy::rollout_for(a);
        }
        let current = a.release.as_ref()?;
        if self.failed.contains(&(a.name.clone(), current.version)) {
            return None;
        }
        let target = Target::of(current, &a.formation);
        let mut others: BTreeMap<u64, u32> = BTreeMap::new();
        for i in instances {
            let counts = i.app == a.name
                && i.owner == Owner::Scheduler
                && !i.state.is_gone()
                && liveness(registry, &i.node) != Liveness::Dead
                && target.formation.contains_key(&i.proc);
            if counts && i.version != current.version {
                *others.entry(i.version).or_insert(0) += 1;
            }
        }
        let (&old, _) = others.iter().max_by_key(|(v, n)| (**n, **v))?;
        Some(Rollout {
            app: a.name.clone(),
            live: Some(Target {
                version: old,
                formation: target.formation.clone(),
            }),
            target,
            restart: false,
        })
    }

    /// Registry × alive_since × offers, for the core.
    fn nodes(
        &mut self,
        runners: &BTreeMap<NodeId, RunnerNode>,
        offers: &BTreeMap<NodeId, u64>,
        now: Instant,
    ) -> Registry {
        let mut out = Registry::new();
        let settled = now.checked_sub(self.s.policy.node_settle).unwrap_or(now);
        for (node, r) in runners {
            if r.liveness == Liveness::Dead {
                self.alive_since.remove(node);
            }
            let since = match r.liveness {
                Liveness::Alive => *self.alive_since.entry(node.clone()).or_insert(
                    // What is alive when we begin to lead is taken as settled:
                    // we cannot know when it came back.
                    if self.first_tick { settled } else { now },
                ),
                _ => self.alive_since.get(node).copied().unwrap_or(now),
            };
            out.insert(
                node.clone(),
                Node {
                    id: node.clone(),
                    liveness: r.liveness,
                    alive_since: since,
                    offer_memory_mb: offers.get(node).copied().unwrap_or(0),
                },
            );
        }
        // Nodes listed before but gone from the registry: dead.
        for node in self.known.keys() {
            out.entry(node.clone()).or_insert_with(|| Node {
                id: node.clone(),
                liveness: Liveness::Dead,
                alive_since: now,
                offer_memory_mb: 0,
            });
        }
        out
    }

    async fn desired(&mut self) -> Result<Vec<DesiredApp>, Stop> {
        let v = self
            .ctx
            .calls()
            .call_daemon("api", "apps.state", json!({}))
            .await
            .map_err(|e| {
                Stop::Skip(format!(
                    "the api's apps.state failed: {}",
                    paddock_daemon::chain(&e)
                ))
            })?;
        let apps: Vec<DesiredApp> = v["apps"]
            .as_array()
            .map(|a| a.iter().filter_map(desired_of).collect())
            .unwrap_or_default();
        self.stop_after = v["apps"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|a| {
                let app = a["name"].as_str().unwrap_or_default().to_string();
                a["scheduling"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .filter_map(move |(proc, s)| {
                        let secs = s["stop_after_disconnect"].as_u64()?;
                        Some(((app.clone(), proc.clone()), secs.saturating_mul(1000)))
                    })
            })
            .collect();
        for a in &apps {
            for r in a.release.iter().chain(a.pending.iter()) {
                self.releases.insert((a.name.clone(), r.version), r.clone());
            }
        }
        Ok(apps)
    }

    async fn release_of(&mut self, app: &str, version: u64) -> Option<Release> {
        if let Some(r) = self.releases.get(&(app.to_string(), version)) {
            return Some(r.clone());
        }
        let v = self
            .ctx
            .calls()
            .call_daemon(
                "api",
                "release.get",
                json!({"app": app, "version": version}),
            )
            .await
            .map_err(|e| {
                tracing::warn!(
                    app,
                    "release.get v{version} failed: {}",
                    paddock_daemon::chain(&e)
                )
            })
            .ok()?;
        let r = release_of(&v["release"])?;
        self.releases.insert((app.to_string(), version), r.clone());
        Some(r)
    }

    /// Sends the starts and stops, all at once; Err when a runner says a newer
    /// scheduler leads. `instances` is updated with what was sent.
    async fn carry_out(
        &mut self,
        starts: Vec<crate::model::StartInstance>,
        stops: Vec<crate::model::StopInstance>,
        apps: &[DesiredApp],
        runners: &BTreeMap<NodeId, RunnerNode>,
        instances: &mut Vec<Instance>,
        now: Instant,
    ) -> Result<(), String> {
        let mut calls = Vec::new();
        for s in starts {
            let key = (s.app.clone(), s.proc.clone());
            if self.start_backoff.get(&key).is_some_and(|b| now < b.until) {
                continue;
            }
            let Some(rpc) = runners.get(&s.node).and_then(|r| r.rpc.clone()) else {
                tracing::warn!(node = s.node, "no runner endpoint to start {} on", s.id);
                continue;
            };
            let Some(release) = self.release_of(&s.app, s.version).await else {
                tracing::warn!(
                    app = s.app,
                    "v{} is unknown: {} not started",
                    s.version,
                    s.id
                );
                continue;
            };
            let health = apps
                .iter()
                .find(|a| a.name == s.app)
                .and_then(|a| a.health.get(&s.proc))
                .map_or_else(|| default_health(&s.proc), health_json);
            let mut body = json!({
                "id": s.id, "app": s.app, "proc": s.proc,
                "release": {"slug": release.slug, "version": s.version},
                "token": s.token, "owner": "scheduler",
                "limits": {"memory_mb": s.memory_mb},
                "health": health,
            });
            if let Some(ms) = self.stop_after.get(&(s.app.clone(), s.proc.clone())) {
                // Never shorter than a leader's contact can be late: two passes
                // and a leader's failover.
                let floor = (2 * self.s.resync + self.s.lease_ttl).as_millis() as u64;
                body["stop_after_disconnect_ms"] = json!((*ms).max(floor));
            }
            tracing::info!(app = s.app, node = s.node, "starting {}", s.id);
            self.seen_ids.insert(s.id.clone());
            let record = Instance {
                id: s.id.clone(),
                app: s.app.clone(),
                proc: s.proc.clone(),
                version: s.version,
                node: s.node.clone(),
                addr: None,
                state: InstanceState::Starting,
                up_at: None,
                memory_mb: s.memory_mb,
                token: s.token,
                owner: Owner::Scheduler,
                restarts: 0,
            };
            instances.push(record.clone());
            self.inflight.insert(s.id.clone(), record);
            // Not awaited: a first start of a slug fetches it, and one that
            // cannot be fetched may take the whole timeout. The reply comes
            // back through `started`; meanwhile the instance counts as starting.
            let p = self
                .ctx
                .calls()
                .call(&rpc, "instance.start", body, self.s.start_timeout);
            let tx = self.started_tx.clone();
            let (what, id) = (format!("start {} on {}", s.id, s.node), s.id.clone());
            tokio::task::spawn_local(async move {
                let _ = tx.send(Started {
                    what,
                    id,
                    key,
                    result: p.await,
                });
            });
        }
        for s in stops {
            let node = instances
                .iter()
                .find(|i| i.id == s.id)
                .map(|i| i.node.clone())
                .or_else(|| {
                    self.deploys
                        .values()
                        .find_map(|d| d.instances().get(&s.id).map(|t| t.node.clone()))
                });
            let Some(rpc) = node
                .as_ref()
                .and_then(|n| runners.get(n))
                .and_then(|r| r.rpc.clone())
            else {
                tracing::warn!("no runner endpoint to stop {} on", s.id);
                continue;
            };
            tracing::info!(node, "stopping {}", s.id);
            for i in instances.iter_mut().filter(|i| i.id == s.id) {
                i.state = InstanceState::Stopping;
            }
            let p = self.ctx.calls().call(
                &rpc,
                "instance.stop",
                json!({"id": s.id, "token": s.token}),
                Duration::from_secs(5),
            );
            calls.push((format!("stop {}", s.id), p));
        }
        let handles: Vec<_> = calls
            .into_iter()
            .map(|(what, p)| tokio::task::spawn_local(async move { (what, p.await) }))
            .collect();
        let mut deposed = None;
        for h in handles {
            let Ok((what, r)) = h.await else { continue };
            match r {
                Ok(_) => {}
                Err(e) if e.code() == Some(&Code::StaleToken) => {
                    deposed = Some(format!("{what}: {}", paddock_daemon::chain(&e)));
                }
                Err(e) if e.code() == Some(&Code::NotFound) => {}
                Err(e) => tracing::warn!("{what} failed: {}", paddock_daemon::chain(&e)),
            }
        }
        deposed.map_or(Ok(()), Err)
    }

    /// The replies to starts sent earlier: Err when a runner says a newer
    /// scheduler leads. A failed start backs off its process type.
    fn started(&mut self, now: Instant) -> Result<(), String> {
        let mut deposed = None;
        while let Ok(Started {
            what,
            id,
            key,
            result,
        }) = self.started_rx.try_recv()
        {
            // Answered: it leaves the starting count once its node's listing,
            // asked after this reply, has been read (`listed`).
            self.replied.insert(id.clone());
            let e = match result {
                Ok(_) => {
                    self.start_backoff.remove(&key);
                    continue;
                }
                Err(e) => e,
            };
            let why = paddock_daemon::chain(&e);
            if e.code() == Some(&Code::StaleToken) {
                deposed = Some(format!("{what}: {why}"));
                continue;
            }
            // Not sent again for that process type before a backoff (1 s
            // doubling to a minute); the same failure is said once.
            let b = self.start_backoff.entry(key).or_insert(StartBackoff {
                until: now,
                failures: 0,
                last: String::new(),
            });
            b.failures += 1;
            let delay = start_delay(b.failures);
            b.until = now + delay;
            if b.last != why {
                tracing::warn!("{what} failed: {why} (tried again in {delay:?} at the earliest)");
                b.last = why;
            }
        }
        deposed.map_or(Ok(()), Err)
    }

    /// Tells the api how a release's deploy went, if it still waits for that.
    async fn status(
        &mut self,
        app: &str,
        version: u64,
        succeeded: bool,
        message: Option<&str>,
        desired: Option<&DesiredApp>,
    ) {
        if succeeded && !self.live.insert((app.to_string(), version)) {
            return;
        }
        // A success is told only while it is the release the api waits for; a
        // failure always (a cancelled release is no longer the newest pending
        // one, and its push waits for its status): the api refuses, with
        // `conflict`, to change a release already marked.
        let pending = desired.and_then(|d| d.pending.as_ref()).map(|p| p.version);
        if succeeded && pending != Some(version) {
            return;
        }
        let status = if succeeded { "succeeded" } else { "failed" };
        let mut body = json!({"app": app, "version": version, "status": status});
        if let Some(m) = message {
            body["message"] = json!(m);
        }
        match self
            .ctx
            .calls()
            .call_daemon("api", "release.status", body)
            .await
        {
            Ok(_) => tracing::info!(app, "v{version} marked {status}"),
            Err(e) if code_of(&e) == Some(&Code::Conflict) => {
                tracing::debug!(app, "v{version} was marked already")
            }
            Err(e) => tracing::warn!(
                app,
                "marking v{version} {status} failed: {}",
                paddock_daemon::chain(&e)
            ),
        }
    }

    /// A rolled-back release that was the api's current one (it went live, or
    /// was made current before its deploy, as the deployer does) is rolled back
    /// at the api too: a new release of `to`'s code, which a later deploy
    /// takes over. A pending one left the current release as it was.
    async fn rollback(&mut self, app: &str, to: u64) {
        match self
            .ctx
            .calls()
            .call_daemon("api", "rollback", json!({"app": app, "version": to}))
            .await
        {
            Ok(_) => tracing::info!(app, "rolled back to v{to} at the api"),
            Err(e) => tracing::warn!(
                app,
                "the api's rollback to v{to} failed: {}",
                paddock_daemon::chain(&e)
            ),
        }
    }

    fn alert(&mut self, app: &str, reason: &str) {
        tracing::warn!(app, "{reason}");
        self.ctx
            .server()
            .publish("alert", json!({"app": app, "reason": reason}));
        self.audit(app, "scheduler.alert", json!({ "reason": reason }));
    }

    /// An entry in the app's audit log, in the background (best effort: a
    /// failure is logged, the pass goes on).
    fn audit(&mut self, app: &str, kind: &str, detail: Value) {
        let body =
            json!({"actor": self.ctx.identity(), "kind": kind, "app": app, "detail": detail});
        // One task sends them, in order, one at a time: a big rollout's lines
        // never take the calls its starts and stops need.
        let tx = self.audit_tx.get_or_insert_with(|| {
            let (tx, mut rx) = mpsc::channel::<Value>(AUDIT_QUEUE);
            let calls = self.ctx.calls().clone();
            tokio::task::spawn_local(async move {
                while let Some(body) = rx.recv().await {
                    if let Err(e) = calls.call_daemon("api", "audit.append", body.clone()).await {
                        tracing::warn!(
                            app = body["app"].as_str().unwrap_or(""),
                            "audit.append failed: {}",
                            paddock_daemon::chain(&e)
                        );
                    }
                }
            });
            tx
        });
        if tx.try_send(body).is_err() {
            tracing::warn!(
                app,
                "the audit queue is full: a `{kind}` entry was not written"
            );
        }
    }

    /// One line of a deploy's trail: published as `deploy.progress` (a push
    /// waiting for its rollout prints it) and kept in the app's audit log
    /// (`paddock deploys info`).
    fn progress(&mut self, app: &str, version: u64, line: &str) {
        tracing::debug!(app, version, "{line}");
        self.ctx.server().publish(
            "deploy.progress",
            json!({"app": app, "version": version, "line": line}),
        );
        self.audit(
            app,
            "scheduler.progress",
            json!({"version": version, "line": line}),
        );
    }

    /// Publishes the table when it changed, and every resync anyway.
    fn publish(&mut self, table: Value, now: Instant) {
        let due = match &self.last_publish {
            None => true,
            Some((at, last)) => *last != table || now.duration_since(*at) >= self.s.resync,
        };
        self.shared.borrow_mut().table = Some(table.clone());
        if due {
            self.ctx.server().publish("routes.table", table.clone());
            self.last_publish = Some((now, table));
        }
    }
}

fn code_of(e: &paddock_daemon::calls::CallError) -> Option<&Code> {
    match e {
        paddock_daemon::calls::CallError::Call(c) => c.code(),
        _ => None,
    }
}

/// How long after its `failures`th failure in a row a start is tried again:
/// 1 s, doubling, at most a minute.
fn start_delay(failures: u32) -> Duration {
    Duration::from_secs(1 << failures.saturating_sub(1).min(6)).min(Duration::from_secs(60))
}

/// An instance as a person reads it: `web.v5.t3.1` of `shop.web.v5.t3.1`.
fn short_id<'a>(app: &str, id: &'a str) -> &'a str {
    id.strip_prefix(app)
        .and_then(|r| r.strip_prefix('.'))
        .unwrap_or(id)
}

/// What a deploy's event means to the person waiting for it.
fn event_line(d: &Deploy, ev: &Event) -> Option<String> {
    match ev {
        Event::Up { id, .. } => {
            let t = d.instances().get(id)?;
            (t.state != InstanceState::Up).then(|| {
                format!(
                    "{} up on {} (health check passed)",
                    short_id(d.app(), id),
                    t.node
                )
            })
        }
        Event::Crashed { id, restarts } => Some(format!(
            "{} crashed after {restarts} restarts",
            short_id(d.app(), id)
        )),
        Event::Lost { id } => {
            let t = d.instances().get(id)?;
            (t.state != InstanceState::Stopped)
                .then(|| format!("{} lost with its node {}", short_id(d.app(), id), t.node))
        }
        _ => None,
    }
}

/// What a deploy's effect means to the person waiting for it.
fn effect_line(app: &str, e: &deploy::Effect) -> Option<String> {
    match e {
        deploy::Effect::StartInstance(s) => Some(format!(
            "starting {} on {}",
            short_id(&s.app, &s.id),
            s.node
        )),
        deploy::Effect::DrainInstance { id } => Some(format!(
            "draining {} (in-flight requests finish)",
            short_id(app, id)
        )),
        deploy::Effect::StopInstance(s) => Some(format!("stopping {}", short_id(app, &s.id))),
        deploy::Effect::Live { version } => Some(format!(
            "v{version} is live: every instance runs it, none of an older release is left"
        )),
        deploy::Effect::Alert { reason } => Some(reason.clone()),
        deploy::Effect::Finished { version, outcome } => Some(format!(
            "the deploy of v{version} {}",
            match outcome {
                Outcome::Succeeded => "succeeded",
                Outcome::Failed => "failed",
                Outcome::RolledBack => "was rolled back",
                Outcome::Cancelled => "was cancelled by a newer release",
            }
        )),
        _ => None,
    }
}

/// A restart of the current release (every instance, or one process type's),
/// rolled like a deploy.
fn restart_rollout(a: &DesiredApp, only: Option<&str>) -> Option<Rollout> {
    let current = a.release.as_ref()?;
    let mut target = Target::of(current, &a.formation);
    if let Some(p) = only {
        target.formation.retain(|k, _| k == p);
        if target.formation.is_empty() {
            return None;
        }
    }
    Some(Rollout {
        app: a.name.clone(),
        live: Some(target.clone()),
        target,
        restart: true,
    })
}

/// The deploy's events: what the runners list now against what it knows.
fn events_for(
    d: &Deploy,
    instances: &[Instance],
    registry: &Registry,
    listed: &BTreeSet<NodeId>,
) -> Vec<Event> {
    let mut out = Vec::new();
    for (id, t) in d.instances() {
        if liveness(registry, &t.node) == Liveness::Dead {
            out.push(Event::Lost { id: id.clone() });
            continue;
        }
        let Some(i) = instances.iter().find(|i| &i.id == id) else {
            if listed.contains(&t.node) {
                out.push(Event::Stopped { id: id.clone() });
            }
            continue;
        };
        match i.state {
            InstanceState::Up => {
                if t.state == InstanceState::Up && i.restarts > t.restarts {
                    out.push(Event::Down {
                        id: id.clone(),
                        restarts: i.restarts,
                    });
                }
                if t.state != InstanceState::Up || i.restarts > t.restarts {
                    if let Some(up_at) = i.up_at {
                        out.push(Event::Up {
                            id: id.clone(),
                            up_at,
                        });
                    }
                }
            }
            InstanceState::Starting | InstanceState::Backoff => {
                if t.state == InstanceState::Up || i.restarts > t.restarts {
                    out.push(Event::Down {
                        id: id.clone(),
                        restarts: i.restarts,
                    });
                }
            }
            InstanceState::Crashed => {
                if t.state != InstanceState::Crashed {
                    out.push(Event::Crashed {
                        id: id.clone(),
                        restarts: i.restarts,
                    });
                }
            }
            InstanceState::Stopping | InstanceState::Stopped => {
                out.push(Event::Stopped { id: id.clone() })
            }
        }
    }
    out
}

/// The target the api wants now: the pending release, else the current one.
fn want_target(a: &DesiredApp) -> Option<Target> {
    let r = a.pending.as_ref().or(a.release.as_ref())?;
    Some(Target::of(r, &a.formation))
}

fn liveness(registry: &Registry, node: &str) -> Liveness {
    registry.get(node).map_or(Liveness::Dead, |n| n.liveness)
}

/// Runner nodes by name: the best state any incarnation of it has (a restarted
/// runner's old incarnation is dead, its new one alive), its endpoints.
fn runner_nodes(services: &[Service]) -> BTreeMap<NodeId, RunnerNode> {
    let rank = |s: &ServiceState| match s {
        ServiceState::Alive => 2,
        ServiceState::Suspect => 1,
        ServiceState::Dead => 0,
    };
    let mut best: BTreeMap<NodeId, &Service> = BTreeMap::new();
    for s in services.iter().filter(|s| s.daemon == "runner") {
        match best.get(&s.node) {
            Some(b) if (rank(&b.state), b.last_seen) >= (rank(&s.state), s.last_seen) => {}
            _ => {
                best.insert(s.node.clone(), s);
            }
        }
    }
    best.into_iter()
        .map(|(node, s)| {
            let liveness = match s.state {
                ServiceState::Alive => Liveness::Alive,
                ServiceState::Suspect => Liveness::Suspect,
                ServiceState::Dead => Liveness::Dead,
            };
            let r = RunnerNode {
                liveness,
                rpc: s.endpoints.get("rpc").cloned(),
            };
            (node, r)
        })
        .collect()
}

/// One `instance.list` item; None for what the scheduler cannot use (the `dir`
/// form has no release: an operator's, taking memory only, kept as version 0).
fn instance_of(v: &Value, node: &str, now: Instant, now_ms: i64) -> Option<Instance> {
    let state = match v["state"].as_str()? {
        "starting" => InstanceState::Starting,
        "up" => InstanceState::Up,
        "backoff" => InstanceState::Backoff,
        "crashed" => InstanceState::Crashed,
        "stopping" => InstanceState::Stopping,
        "stopped" => InstanceState::Stopped,
        _ => return None,
    };
    let owner = match v["owner"].as_str() {
        Some("scheduler") => Owner::Scheduler,
        _ => Owner::Operator,
    };
    let up_at = v["up_at"].as_i64().map(|ms| {
        let ago = Duration::from_millis(u64::try_from(now_ms - ms).unwrap_or(0));
        now.checked_sub(ago).unwrap_or(now)
    });
    Some(Instance {
        id: v["id"].as_str()?.to_string(),
        app: v["app"].as_str()?.to_string(),
        proc: v["proc"].as_str()?.to_string(),
        version: v["release"].as_u64().unwrap_or(0),
        node: node.to_string(),
        addr: v["addr"].as_str().map(str::to_string),
        state,
        up_at,
        memory_mb: v["memory_mb"].as_u64().unwrap_or(0),
        token: v["token"].as_u64().unwrap_or(0),
        owner,
        restarts: v["restarts"].as_u64().unwrap_or(0) as u32,
    })
}

/// A release as `app.state` or `release.get` gives it; None without a slug
/// (nothing to run).
fn release_of(v: &Value) -> Option<Release> {
    let slug = v["slug"].as_str()?;
    let slug = slug.strip_prefix("sha256:").unwrap_or(slug).to_string();
    let process_types = v["process_types"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, c)| Some((k.clone(), c.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default();
    let env = v["config"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, c)| Some((k.clone(), c.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default();
    Some(Release {
        version: v["version"].as_u64()?,
        slug,
        process_types,
        env,
    })
}

/// One app of `apps.state`.
fn desired_of(v: &Value) -> Option<DesiredApp> {
    let name = v["name"].as_str()?.to_string();
    let mut formation = Formation::new();
    for f in v["formation"].as_array().into_iter().flatten() {
        let (Some(t), Some(q)) = (f["type"].as_str(), f["quantity"].as_u64()) else {
            continue;
        };
        formation.insert(
            t.to_string(),
            Scale {
                quantity: q as u32,
                memory_mb: f["memory_mb"].as_u64().unwrap_or(0),
            },
        );
    }
    let domains = v["domains"]
        .as_array()
        .map(|d| {
            d.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let mut health = BTreeMap::new();
    if let Some(m) = v["healthchecks"].as_object() {
        for (proc, checks) in m {
            health.insert(proc.clone(), health_of(proc, checks));
        }
    }
    Some(DesiredApp {
        name,
        release: release_of(&v["current"]),
        pending: release_of(&v["pending"]),
        formation,
        domains,
        health,
    })
}

/// Dokku's checks → the runner's: a path is an HTTP check; else `web` gets a
/// TCP connect and other types (workers, usually without a port) none.
fn health_of(proc: &str, checks: &Value) -> HealthCheck {
    let path = checks
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|c| c["path"].as_str());
    match path {
        Some(p) => HealthCheck::Http(p.to_string()),
        None if crate::model::is_routed(proc) => HealthCheck::Tcp,
        None => HealthCheck::None,
    }
}

fn health_json(h: &HealthCheck) -> Value {
    match h {
        HealthCheck::Http(p) => json!({"http": p}),
        HealthCheck::Tcp => json!({"tcp": true}),
        HealthCheck::None => json!({"none": true}),
    }
}

fn default_health(proc: &str) -> Value {
    health_json(&health_of(proc, &Value::Null))
}

/// The wire's `routes.table` body.
pub fn table_json(t: &RouteTable) -> Value {
    json!({
        "token": t.token,
        "apps": t.apps.iter().map(|a| json!({
            "app": a.app,
            "domains": a.domains,
            "backends": a.backends.iter().map(|b| json!({
                "id": b.id, "addr": b.addr, "draining": b.draining,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_state_is_read_into_the_core_model() {
        let v = json!({"name": "shop", "id": 3,
            "current": {"version": 2, "slug": "sha256:aa", "process_types": {"web": "python app.py", "worker": "w"},
                        "config": {"A": "1"}},
            "pending": null,
            "formation": [{"type": "web", "quantity": 2, "memory_mb": 128, "pids": 100, "command": "x"}],
            "domains": ["shop.localhost"],
            "healthchecks": {"web": [{"type": "startup", "path": "/health"}], "worker": [{"type": "tcp"}]}});
        let a = desired_of(&v).unwrap();
        assert_eq!(a.name, "shop");
        let r = a.release.unwrap();
        assert_eq!((r.version, r.slug.as_str()), (2, "aa"));
        assert_eq!(r.env["A"], "1");
        assert!(a.pending.is_none());
        assert_eq!(
            a.formation["web"],
            Scale {
                quantity: 2,
                memory_mb: 128
            }
        );
        assert_eq!(a.domains, vec!["shop.localhost"]);
        assert_eq!(a.health["web"], HealthCheck::Http("/health".into()));
        assert_eq!(a.health["worker"], HealthCheck::None);
        // A slugless release (an app's v1) runs nothing.
        let v = json!({"name": "new", "current": {"version": 1, "slug": null}, "formation": []});
        assert!(desired_of(&v).unwrap().release.is_none());
    }

    #[test]
    fn list_items_become_instances_with_up_at_in_the_past() {
        let now = Instant::now();
        let v = json!({"id": "shop.web.v2.t7.1", "app": "shop", "proc": "web", "state": "up",
            "restarts": 1, "addr": "127.0.0.1:20001", "release": 2, "token": 7,
            "up_at": 1_000_000, "owner": "scheduler", "memory_mb": 128});
        let i = instance_of(&v, "node-a", now, 1_002_500).unwrap();
        assert_eq!(i.version, 2);
        assert_eq!(i.owner, Owner::Scheduler);
        assert_eq!(i.token, 7);
        assert_eq!(now - i.up_at.unwrap(), Duration::from_millis(2500));
        let v = json!({"id": "x", "app": "shop", "proc": "web", "state": "starting",
            "release": null, "token": null, "up_at": null, "owner": "operator"});
        let i = instance_of(&v, "node-a", now, 0).unwrap();
        assert_eq!((i.owner, i.version, i.up_at), (Owner::Operator, 0, None));
    }

    #[test]
    fn failed_starts_back_off_to_a_minute() {
        let d: Vec<u64> = (1..=9).map(|n| start_delay(n).as_secs()).collect();
        assert_eq!(d, vec![1, 2, 4, 8, 16, 32, 60, 60, 60]);
    }

    #[test]
    fn the_best_incarnation_of_a_runner_node_wins() {
        let s = |node: &str, state, seen, port: u16| Service {
            daemon: "runner".into(),
            node: node.into(),
            incarnation: format!("{node}{seen}"),
            endpoints: [("rpc".to_string(), format!("tcp://127.0.0.1:{port}"))].into(),
            state,
            last_seen: seen,
            interval_ms: 200,
        };
        let r = runner_nodes(&[
            s("a", ServiceState::Dead, 5, 1),
            s("a", ServiceState::Alive, 3, 2),
            s("b", ServiceState::Suspect, 1, 3),
        ]);
        assert_eq!(r["a"].liveness, Liveness::Alive);
        assert_eq!(r["a"].rpc.as_deref(), Some("tcp://127.0.0.1:2"));
        assert_eq!(r["b"].liveness, Liveness::Suspect);
    }
}
