//! One app's rolling deploy as a pure state machine. [`Deploy::step`] takes an
//! event (an instance's news from its runner, a balancer's drain confirmation, a
//! timer, a newer release), the time, the policy and a [`World`] (the fencing
//! token and the nodes' [`Room`]), changes the deploy, and returns the effects
//! for the actor to carry out. Nothing else changes a deploy, and nothing here
//! does I/O.
//!
//! The rules are the same for a rollout, a rollback and a newer release taking
//! over: converge every process type to the *target* (a release version and its
//! formation), one surge instance at a time:
//! - an instance not of the target that is not up serves nothing: stop it;
//! - start one target instance when none is in flight (every target instance
//!   is *settled*: up for `min_healthy` since its `up_at`) and fewer than
//!   formation + 1 count; when nothing else counts, start all that are missing;
//! - retire one non-target instance once more than the formation count and
//!   none is in flight: a routed one is drained first and stopped when the
//!   balancer confirms or `drain_period` passes.
//!
//! So the routed, healthy count never drops below what it was, and never to 0.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use crate::model::{
    is_routed, new_id, DesiredApp, Formation, Instance, InstanceId, InstanceState, NodeId, Policy,
    Proc, Release, StartInstance, StopInstance, Token,
};
use crate::placement::Room;

/// What a deploy converges to.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub version: u64,
    pub formation: Formation,
}

impl Target {
    /// A release with the formation's process types that it has.
    pub fn of(release: &Release, formation: &Formation) -> Target {
        let formation = formation
            .iter()
            .filter(|(proc, _)| release.process_types.contains_key(*proc))
            .map(|(proc, scale)| (proc.clone(), *scale))
            .collect();
        Target {
            version: release.version,
            formation,
        }
    }
}

/// The deploy an app's desired state asks for: its pending release, from the
/// one serving now (None when nothing is pending). The formation is the app's
/// now; the actor keeps the `Rollout` it began with, so a rollback restores
/// exactly the release and formation that served.
pub fn rollout_for(app: &DesiredApp) -> Option<Rollout> {
    let pending = app.pending.as_ref()?;
    Some(Rollout {
        app: app.name.clone(),
        live: app.release.as_ref().map(|r| Target::of(r, &app.formation)),
        target: Target::of(pending, &app.formation),
        restart: false,
    })
}

/// How a release's deploy ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It went live and stayed healthy through the watch window.
    Succeeded,
    /// It failed and nothing could be restored (no earlier release, a restart
    /// of the same release, or the rollback itself failed).
    Failed,
    /// It failed and the previous release and formation serve again.
    RolledBack,
    /// A newer release replaced it before it went live.
    Cancelled,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Replacing the live release's instances with the target's.
    Rolling,
    /// The target is live; a crash loop before `watch_window` ends rolls back.
    Watching,
    /// Restoring the previous release after a failure.
    RollingBack,
    Done,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Timer {
    /// `healthy_deadline` after the instance's start.
    HealthyBy { id: InstanceId },
    /// `min_healthy` after the instance's `up_at`.
    Settled { id: InstanceId },
    /// `drain_period` after the instance's drain began.
    DrainOver { id: InstanceId },
    /// `progress_deadline` after the round began.
    Progress { round: u64 },
    /// `watch_window` after the target went live.
    WatchOver { round: u64 },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Its health check passed (first at `up_at`, this run).
    Up {
        id: InstanceId,
        up_at: Instant,
    },
    /// It is down and its runner restarting it (`starting` or `backoff`).
    Down {
        id: InstanceId,
        restarts: u32,
    },
    /// Its runner gave up on it.
    Crashed {
        id: InstanceId,
        restarts: u32,
    },
    Stopped {
        id: InstanceId,
    },
    /// Its node is dead: it counts for nothing any more.
    Lost {
        id: InstanceId,
    },
    /// A balancer has nothing in flight to it any more.
    DrainConfirmed {
        id: InstanceId,
    },
    Timer(Timer),
    /// A newer release (or a restart: every instance replaced) takes over.
    Newer {
        target: Target,
        restart: bool,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    StartInstance(StartInstance),
    /// Marked draining in the route table (published with the next `PublishRoutes`).
    DrainInstance {
        id: InstanceId,
    },
    StopInstance(StopInstance),
    /// The routes changed: publish `routes::table` (with the token).
    PublishRoutes,
    /// Step `Event::Timer(timer)` after `delay`.
    After {
        delay: Duration,
        timer: Timer,
    },
    /// Make `to` the app's current release again (the api records it).
    Rollback {
        to: u64,
    },
    /// For the audit log and the operators.
    Alert {
        reason: String,
    },
    /// The target serves alone now (the push may be told).
    Live {
        version: u64,
    },
    Finished {
        version: u64,
        outcome: Outcome,
    },
}

/// What a deploy is asked to do.
#[derive(Debug, Clone, PartialEq)]
pub struct Rollout {
    pub app: String,
    /// The release serving now, with its formation (None: the first release).
    pub live: Option<Target>,
    pub target: Target,
    /// Replace every instance, even those of the target's version (`ps restart`).
    pub restart: bool,
}

/// The cluster as a step sees it: the current fencing token, the nodes' room,
/// and every instance id known (any app, node or state: a new id is none of them).
#[derive(Debug, Clone)]
pub struct World {
    pub token: Token,
    pub room: Room,
    pub taken: BTreeSet<InstanceId>,
}

/// One instance of the app, as the deploy knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Tracked {
    pub proc: Proc,
    pub version: u64,
    pub node: NodeId,
    pub state: InstanceState,
    pub up_at: Option<Instant>,
    pub restarts: u32,
    /// Its restarts when the deploy began (a crash loop counts from there).
    base_restarts: u32,
    /// To be replaced even if of the target's version (a restart).
    stale: bool,
    draining_since: Option<Instant>,
    stop_sent: bool,
}

impl Tracked {
    fn counts(&self) -> bool {
        !self.stop_sent && self.draining_since.is_none()
    }

    fn settled(&self, now: Instant, p: &Policy) -> bool {
        self.state == InstanceState::Up && self.up_at.is_some_and(|u| now >= u + p.min_healthy)
    }
}

#[derive(Debug, Clone)]
pub struct Deploy {
    app: String,
    target: Target,
    /// The release that served before (what a rollback restores).
    live: Option<Target>,
    /// The version being rolled back from.
    failed: Option<u64>,
    phase: Phase,
    /// Bumped with every new target: older deadlines stand down.
    round: u64,
    instances: BTreeMap<InstanceId, Tracked>,
    /// Every id it began with or gave: never given again, even once forgotten.
    named: BTreeSet<InstanceId>,
}

impl Deploy {
    /// Starts converging the app to `r.target`. `existing`: the app's
    /// scheduler instances on nodes not dead. A new leader resumes a deploy the
    /// same way, from what runs.
    pub fn begin(
        r: Rollout,
        existing: &[Instance],
        now: Instant,
        p: &Policy,
        w: &mut World,
    ) -> (Deploy, Vec<Effect>) {
        let Rollout {
            app,
            live,
            target,
            restart,
        } = r;
        let instances: BTreeMap<InstanceId, Tracked> = existing
            .iter()
            .filter(|i| i.app == app && !i.state.is_gone())
            .map(|i| {
                let t = Tracked {
                    proc: i.proc.clone(),
                    version: i.version,
                    node: i.node.clone(),
                    state: i.state,
                    up_at: i.up_at,
                    restarts: i.restarts,
                    base_restarts: i.restarts,
                    stale: false,
                    draining_since: None,
                    stop_sent: false,
                };
                (i.id.clone(), t)
            })
            .collect();
        let named = instances.keys().cloned().collect();
        let mut d = Deploy {
            named,
            app,
            target: target.clone(),
            live,
            failed: None,
            phase: Phase::Rolling,
            round: 0,
            instances,
        };
        let mut fx = Vec::new();
        // What it began with gets the timers its events would have set: an up
        // instance not yet settled is looked at again when it is (else nothing
        // may step the deploy until a deadline), one not up has its deadline.
        for (id, t) in &d.instances {
            match t.up_at {
                Some(up_at) if t.state == InstanceState::Up && !t.settled(now, p) => {
                    fx.push(Effect::After {
                        delay: (up_at + p.min_healthy).saturating_duration_since(now),
                        timer: Timer::Settled { id: id.clone() },
                    })
                }
                None if t.state != InstanceState::Up => fx.push(Effect::After {
                    delay: p.healthy_deadline,
                    timer: Timer::HealthyBy { id: id.clone() },
                }),
                _ => {}
            }
        }
        d.retarget(target, restart, Phase::Rolling, p, &mut fx);
        d.settle(now, p, w, &mut fx);
        (d, fx)
    }

    pub fn app(&self) -> &str {
        &self.app
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    pub fn instances(&self) -> &BTreeMap<InstanceId, Tracked> {
        &self.instances
    }

    /// Instances being drained: `draining` in the route table.
    pub fn draining(&self) -> BTreeSet<InstanceId> {
        self.instances
            .iter()
            .filter(|(_, t)| t.draining_since.is_some() && !t.stop_sent)
            .map(|(id, _)| id.clone())
            .collect()
    }

    pub fn step(&mut self, ev: Event, now: Instant, p: &Policy, w: &mut World) -> Vec<Effect> {
        let mut fx = Vec::new();
        if self.phase == Phase::Done {
            return fx;
        }
        match ev {
            Event::Up { id, up_at } => {
                if let Some(t) = self.instances.get_mut(&id) {
                    t.state = InstanceState::Up;
                    t.up_at = Some(up_at);
                    let delay = (up_at + p.min_healthy).saturating_duration_since(now);
                    fx.push(Effect::After {
                        delay,
                        timer: Timer::Settled { id },
                    });
                    if is_routed(&t.proc) {
                        fx.push(Effect::PublishRoutes);
                    }
                }
            }
            Event::Down { id, restarts } => {
                self.down(&id, InstanceState::Backoff, restarts, &mut fx)
            }
            Event::Crashed { id, restarts } => {
                self.down(&id, InstanceState::Crashed, restarts, &mut fx)
            }
            Event::Stopped { id } | Event::Lost { id } => {
                if let Some(t) = self.instances.remove(&id) {
                    if is_routed(&t.proc) && t.state == InstanceState::Up {
                        fx.push(Effect::PublishRoutes);
                    }
                }
            }
            Event::DrainConfirmed { id } | Event::Timer(Timer::DrainOver { id }) => {
                if self
                    .instances
                    .get(&id)
                    .is_some_and(|t| t.draining_since.is_some())
                {
                    self.stop(&id, w.token, &mut fx);
                }
            }
            Event::Timer(Timer::HealthyBy { id }) => {
                let late = self
                    .instances
                    .get(&id)
                    .is_some_and(|t| self.is_target(t) && t.counts() && t.up_at.is_none());
                if late {
                    let secs = p.healthy_deadline.as_secs_f64();
                    self.fail(
                        format!("{id} was not up within {secs}s"),
                        w.token,
                        p,
                        &mut fx,
                    );
                }
            }
            Event::Timer(Timer::Settled { .. }) => {}
            Event::Timer(Timer::Progress { round }) => {
                let rolling = matches!(self.phase, Phase::Rolling | Phase::RollingBack);
                if round == self.round && rolling {
                    let secs = p.progress_deadline.as_secs_f64();
                    self.fail(format!("not done within {secs}s"), w.token, p, &mut fx);
                }
            }
            Event::Timer(Timer::WatchOver { round }) => {
                if round == self.round && self.phase == Phase::Watching {
                    self.finish(self.target.version, Outcome::Succeeded, &mut fx);
                }
            }
            Event::Newer { target, restart } => {
                let (version, outcome) = match self.phase {
                    Phase::Rolling => (self.target.version, Outcome::Cancelled),
                    Phase::Watching => {
                        self.live = Some(self.target.clone());
                        (self.target.version, Outcome::Succeeded)
                    }
                    _ => (self.failed.unwrap_or(self.target.version), Outcome::Failed),
                };
                fx.push(Effect::Finished { version, outcome });
                self.failed = None;
                self.retarget(target, restart, Phase::Rolling, p, &mut fx);
            }
        }
        if let Some(reason) = self.crash_loop(p) {
            self.fail(reason, w.token, p, &mut fx);
        }
        self.settle(now, p, w, &mut fx);
        fx
    }

    fn down(&mut self, id: &str, state: InstanceState, restarts: u32, fx: &mut Vec<Effect>) {
        if let Some(t) = self.instances.get_mut(id) {
            if t.state == InstanceState::Up && is_routed(&t.proc) {
                fx.push(Effect::PublishRoutes);
            }
            t.state = state;
            t.restarts = restarts;
        }
    }

    fn is_target(&self, t: &Tracked) -> bool {
        !t.stale && t.version == self.target.version
    }

    /// A target instance crashed or restarted `crash_restarts` times since the
    /// deploy began, while rolling out or watching.
    fn crash_loop(&self, p: &Policy) -> Option<String> {
        if !matches!(self.phase, Phase::Rolling | Phase::Watching) {
            return None;
        }
        self.instances
            .iter()
            .filter(|(_, t)| self.is_target(t) && !t.stop_sent)
            .find_map(|(id, t)| {
                let restarts = t.restarts.saturating_sub(t.base_restarts);
                if t.state == InstanceState::Crashed {
                    Some(format!("{id} crashed"))
                } else if restarts >= p.crash_restarts {
                    Some(format!("{id} restarted {restarts} times"))
                } else {
                    None
                }
            })
    }

    /// A new target: a new round with its own progress deadline; instances of
    /// other versions (all of them, for a restart) are to be replaced.
    fn retarget(
        &mut self,
        target: Target,
        restart: bool,
        phase: Phase,
        p: &Policy,
        fx: &mut Vec<Effect>,
    ) {
        for t in self.instances.values_mut() {
            t.stale = restart || t.version != target.version;
        }
        self.target = target;
        self.phase = phase;
        self.round += 1;
        fx.push(Effect::After {
            delay: p.progress_deadline,
            timer: Timer::Progress { round: self.round },
        });
    }

    /// The target failed: roll back to the live release if there is one to
    /// restore, else give up. A failing rollback gives up.
    fn fail(&mut self, reason: String, token: Token, p: &Policy, fx: &mut Vec<Effect>) {
        let version = self.target.version;
        match self.phase {
            Phase::Rolling | Phase::Watching => {
                let restore = self.live.clone().filter(|l| l.version != version);
                match restore {
                    Some(live) => {
                        fx.push(Effect::Alert {
                            reason: format!(
                                "{} v{version}: {reason}; rolling back to v{}",
                                self.app, live.version
                            ),
                        });
                        fx.push(Effect::Rollback { to: live.version });
                        self.failed = Some(version);
                        self.retarget(live, false, Phase::RollingBack, p, fx);
                    }
                    None => {
                        fx.push(Effect::Alert {
                            reason: format!(
                                "{} v{version}: {reason}; nothing to roll back to",
                                self.app
                            ),
                        });
                        self.give_up(version, token, fx);
                    }
                }
            }
            Phase::RollingBack => {
                let failed = self.failed.unwrap_or(version);
                fx.push(Effect::Alert {
                    reason: format!("{} rollback to v{version}: {reason}", self.app),
                });
                self.give_up(failed, token, fx);
            }
            Phase::Done => {}
        }
    }

    /// Ends as failed: what serves keeps serving, what never came up is stopped;
    /// the reconciler takes the app over from here.
    fn give_up(&mut self, version: u64, token: Token, fx: &mut Vec<Effect>) {
        let idle: Vec<InstanceId> = self
            .instances
            .iter()
            .filter(|(_, t)| t.counts() && t.state != InstanceState::Up)
            .map(|(id, _)| id.clone())
            .collect();
        for id in idle {
            self.stop(&id, token, fx);
        }
        fx.push(Effect::Finished {
            version,
            outcome: Outcome::Failed,
        });
        self.phase = Phase::Done;
    }

    fn finish(&mut self, version: u64, outcome: Outcome, fx: &mut Vec<Effect>) {
        fx.push(Effect::Finished { version, outcome });
        self.phase = Phase::Done;
    }

    /// Converges, rolling back (once) when a start cannot be placed; then
    /// checks whether the round is done.
    fn settle(&mut self, now: Instant, p: &Policy, w: &mut World, fx: &mut Vec<Effect>) {
        for _ in 0..3 {
            if self.phase == Phase::Done {
                return;
            }
            match self.converge(now, p, w, fx) {
                Ok(()) => break,
                Err(reason) => self.fail(reason, w.token, p, fx),
            }
        }
        if self.phase == Phase::Done {
            return;
        }
        if self.converged(now, p) {
            match self.phase {
                Phase::Rolling => {
                    fx.push(Effect::Live {
                        version: self.target.version,
                    });
                    self.phase = Phase::Watching;
                    fx.push(Effect::After {
                        delay: p.watch_window,
                        timer: Timer::WatchOver { round: self.round },
                    });
                }
                Phase::RollingBack => {
                    let failed = self.failed.unwrap_or(self.target.version);
                    self.finish(failed, Outcome::RolledBack, fx);
                }
                Phase::Watching | Phase::Done => {}
            }
        }
    }

    fn procs(&self) -> BTreeSet<Proc> {
        let mut procs: BTreeSet<Proc> = self.target.formation.keys().cloned().collect();
        procs.extend(self.instances.values().map(|t| t.proc.clone()));
        procs
    }

    fn quantity(&self, proc: &str) -> u32 {
        self.target.formation.get(proc).map_or(0, |s| s.quantity)
    }

    /// One pass of the rules over every process type; Err when a needed
    /// instance cannot be placed.
    fn converge(
        &mut self,
        now: Instant,
        p: &Policy,
        w: &mut World,
        fx: &mut Vec<Effect>,
    ) -> Result<(), String> {
        for proc in self.procs() {
            self.stop_idle_others(&proc, w.token, fx);
            self.start_missing(&proc, now, p, w, fx)?;
            self.retire_extra(&proc, now, p, w.token, fx);
        }
        Ok(())
    }

    /// Instances not of the target that are not up serve nothing: stopped at
    /// once (no drain: they are not in the table). So are crashed ones.
    fn stop_idle_others(&mut self, proc: &str, token: Token, fx: &mut Vec<Effect>) {
        let idle: Vec<InstanceId> = self
            .instances
            .iter()
            .filter(|(_, t)| t.proc == proc && t.counts())
            .filter(|(_, t)| {
                let other = !self.is_target(t) && t.state != InstanceState::Up;
                other || t.state == InstanceState::Crashed
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in idle {
            self.stop(&id, token, fx);
        }
    }

    fn start_missing(
        &mut self,
        proc: &str,
        now: Instant,
        p: &Policy,
        w: &mut World,
        fx: &mut Vec<Effect>,
    ) -> Result<(), String> {
        let want = self.quantity(proc);
        let (mut active, mut target, mut in_flight) = (0, 0, 0);
        for t in self
            .instances
            .values()
            .filter(|t| t.proc == proc && t.counts())
        {
            active += 1;
            if self.is_target(t) {
                target += 1;
                in_flight += u32::from(!t.settled(now, p));
            }
        }
        let starts = if active == target {
            // Nothing else serves: no healthy count to protect.
            want.saturating_sub(target)
        } else if in_flight == 0 && target < want && active < want + 1 {
            1
        } else {
            0
        };
        let memory_mb = self.target.formation.get(proc).map_or(0, |s| s.memory_mb);
        for _ in 0..starts {
            let Some(node) = w.room.place(&self.app, proc, memory_mb) else {
                return Err(format!(
                    "no runner has {memory_mb} MB for another {proc} instance"
                ));
            };
            let version = self.target.version;
            let taken = self.named.iter().chain(&w.taken).map(String::as_str);
            let id = new_id(&self.app, proc, version, w.token, taken);
            self.named.insert(id.clone());
            self.instances.insert(
                id.clone(),
                Tracked {
                    proc: proc.to_string(),
                    version,
                    node: node.clone(),
                    state: InstanceState::Starting,
                    up_at: None,
                    restarts: 0,
                    base_restarts: 0,
                    stale: false,
                    draining_since: None,
                    stop_sent: false,
                },
            );
            fx.push(Effect::StartInstance(StartInstance {
                id: id.clone(),
                app: self.app.clone(),
                proc: proc.to_string(),
                version,
                node,
                memory_mb,
                token: w.token,
            }));
            fx.push(Effect::After {
                delay: p.healthy_deadline,
                timer: Timer::HealthyBy { id },
            });
        }
        Ok(())
    }

    /// While more than the formation count and no target instance is in
    /// flight, one non-target instance goes (drained first if routed).
    fn retire_extra(
        &mut self,
        proc: &str,
        now: Instant,
        p: &Policy,
        token: Token,
        fx: &mut Vec<Effect>,
    ) {
        loop {
            let counted: Vec<(&InstanceId, &Tracked)> = self
                .instances
                .iter()
                .filter(|(_, t)| t.proc == proc && t.counts())
                .collect();
            let in_flight = counted
                .iter()
                .any(|(_, t)| self.is_target(t) && !t.settled(now, p));
            if counted.len() as u32 <= self.quantity(proc) || in_flight {
                return;
            }
            // The oldest release's first: they have served longest.
            let Some(id) = counted
                .iter()
                .filter(|(_, t)| !self.is_target(t))
                .min_by_key(|(id, t)| (t.version, (*id).clone()))
                .map(|(id, _)| (*id).clone())
            else {
                return;
            };
            self.retire(&id, now, p, token, fx);
        }
    }

    fn retire(&mut self, id: &str, now: Instant, p: &Policy, token: Token, fx: &mut Vec<Effect>) {
        let Some(t) = self.instances.get_mut(id) else {
            return;
        };
        if is_routed(&t.proc) && t.state == InstanceState::Up {
            t.draining_since = Some(now);
            fx.push(Effect::DrainInstance { id: id.to_string() });
            fx.push(Effect::PublishRoutes);
            fx.push(Effect::After {
                delay: p.drain_period,
                timer: Timer::DrainOver { id: id.to_string() },
            });
        } else {
            self.stop(id, token, fx);
        }
    }

    fn stop(&mut self, id: &str, token: Token, fx: &mut Vec<Effect>) {
        let Some(t) = self.instances.get_mut(id) else {
            return;
        };
        if t.stop_sent {
            return;
        }
        let was_routed = is_routed(&t.proc) && t.state == InstanceState::Up;
        t.stop_sent = true;
        fx.push(Effect::StopInstance(StopInstance {
            id: id.to_string(),
            token,
        }));
        if was_routed {
            fx.push(Effect::PublishRoutes);
        }
    }

    /// Every process type has exactly its formation count of settled target
    /// instances, and everything else has been sent its stop.
    fn converged(&self, now: Instant, p: &Policy) -> bool {
        self.procs().iter().all(|proc| {
            let mut settled = 0;
            for t in self
                .instances
                .values()
                .filter(|t| &t.proc == proc && !t.stop_sent)
            {
                if !self.is_target(t) || !t.counts() || !t.settled(now, p) {
                    return false;
                }
                settled += 1;
            }
            settled == self.quantity(proc)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Owner, Registry, Scale};
    use crate::placement::tests::{inst, nodes, policy};

    /// A deploy begun while instances are up but not yet settled (a release
    /// just after a scale, a new leader) is stepped again when they settle,
    /// and one begun with an instance not up has its healthy deadline.
    #[test]
    fn begin_sets_the_timers_of_what_it_finds() {
        let t0 = Instant::now();
        let now = t0 + Duration::from_secs(3600);
        let p = policy();
        let reg = nodes(t0, &["n1", "n2"], 4096);
        let mut fresh = inst("a.web.v1.t1.1", "a", "web", "n1", 256);
        fresh.up_at = Some(now - Duration::from_secs(4));
        let mut old = inst("a.web.v1.t1.2", "a", "web", "n2", 256);
        old.up_at = Some(now - Duration::from_secs(3000));
        let mut starting = inst("a.web.v1.t1.3", "a", "web", "n2", 256);
        starting.state = InstanceState::Starting;
        let existing = vec![fresh, old, starting];
        let mut w = World {
            token: 1,
            room: Room::new(&reg, &existing, now, &p),
            taken: BTreeSet::new(),
        };
        let f = formation(2, 0);
        let r = Rollout {
            app: "a".into(),
            live: Some(target(1, &f)),
            target: target(2, &f),
            restart: false,
        };
        let (_, fx) = Deploy::begin(r, &existing, now, &p, &mut w);
        assert!(fx.contains(&Effect::After {
            delay: Duration::from_secs(6),
            timer: Timer::Settled {
                id: "a.web.v1.t1.1".into()
            },
        }));
        assert!(!fx.iter().any(|e| matches!(e,
            Effect::After { timer: Timer::Settled { id }, .. } if id == "a.web.v1.t1.2")));
        assert!(fx.contains(&Effect::After {
            delay: p.healthy_deadline,
            timer: Timer::HealthyBy {
                id: "a.web.v1.t1.3".into()
            },
        }));
    }

    /// How a release's instances behave on the simulated runners.
    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Behaviour {
        /// Up 2 s after its start.
        Good,
        /// Never passes its health check.
        NeverUp,
        /// Up 2 s after its start, crashed (restarts exhausted) `after` that.
        UpThenCrash { after: Duration },
        /// Up after 2 s, then down and up again every 3 s, counting restarts.
        Flapping,
    }

    fn formation(web: u32, worker: u32) -> Formation {
        let mut f = Formation::new();
        for (proc, quantity) in [("web", web), ("worker", worker)] {
            if quantity > 0 {
                f.insert(
                    proc.to_string(),
                    Scale {
                        quantity,
                        memory_mb: 256,
                    },
                );
            }
        }
        f
    }

    fn target(version: u64, f: &Formation) -> Target {
        Target {
            version,
            formation: f.clone(),
        }
    }

    /// Runners, balancer and timers around one deploy, in simulated time. Every
    /// drain or stop of an up, routed instance is checked against the
    /// invariant: the other up, routed instances still number `floor` or more.
    struct Sim {
        now: Instant,
        p: Policy,
        token: Token,
        reg: Registry,
        world: BTreeMap<InstanceId, Instance>,
        queue: Vec<(Instant, u64, Event)>,
        seq: u64,
        behave: BTreeMap<u64, Behaviour>,
        deploy: Option<Deploy>,
        /// (time, effect), everything the deploy asked for.
        log: Vec<(Instant, Effect)>,
        floor: BTreeMap<Proc, u32>,
        /// The balancer confirms drains after 1 s (else the drain period runs out).
        confirm_drains: bool,
        /// Versions that ever had an instance up.
        ups: BTreeSet<u64>,
        /// Also check after every step that the healthy count is at its floor
        /// (off where the app itself crashes its instances).
        strict: bool,
    }

    impl Sim {
        /// `app` serving `v1` with `f`, every instance up for an hour.
        fn new(f: &Formation, v1: Behaviour) -> Sim {
            let t0 = Instant::now();
            let now = t0 + Duration::from_secs(3600);
            let reg = nodes(t0, &["n1", "n2", "n3"], 4096);
            let mut world = BTreeMap::new();
            let mut k = 0;
            for (proc, s) in f {
                for _ in 0..s.quantity {
                    k += 1;
                    let node = format!("n{}", k % 3 + 1);
                    let mut i = inst(&format!("app.{proc}.v1.t1.{k}"), "app", proc, &node, 256);
                    i.up_at = Some(t0);
                    if !is_routed(proc) {
                        i.addr = None;
                    }
                    world.insert(i.id.clone(), i);
                }
            }
            let floor = f.iter().map(|(p, s)| (p.clone(), s.quantity)).collect();
            Sim {
                now,
                p: policy(),
                token: 2,
                reg,
                world,
                queue: Vec::new(),
                seq: 0,
                behave: BTreeMap::from([(1, v1)]),
                deploy: None,
                log: Vec::new(),
                floor,
                confirm_drains: true,
                ups: BTreeSet::new(),
                strict: true,
            }
        }

        fn world(&self) -> World {
            let list: Vec<Instance> = self.world.values().cloned().collect();
            World {
                token: self.token,
                room: Room::new(&self.reg, &list, self.now, &self.p),
                taken: self.world.keys().cloned().collect(),
            }
        }

        fn begin(&mut self, live: Option<Target>, to: Target, b: Behaviour, restart: bool) {
            self.behave.insert(to.version, b);
            let list: Vec<Instance> = self.world.values().cloned().collect();
            let mut w = self.world();
            let r = Rollout {
                app: "app".into(),
                live,
                target: to,
                restart,
            };
            let (d, fx) = Deploy::begin(r, &list, self.now, &self.p, &mut w);
            self.deploy = Some(d);
            self.apply(fx);
        }

        fn at(&mut self, delay: Duration, ev: Event) {
            self.seq += 1;
            self.queue.push((self.now + delay, self.seq, ev));
        }

        fn secs(s: u64) -> Duration {
            Duration::from_secs(s)
        }

        /// Runs events in time order until the deploy is done (or `until`).
        fn run_until(&mut self, until: Option<Duration>) {
            let limit = self.now + until.unwrap_or(Duration::from_secs(7200));
            loop {
                if self
                    .deploy
                    .as_ref()
                    .is_some_and(|d| d.phase() == Phase::Done)
                    && until.is_none()
                {
                    return;
                }
                self.queue.sort_by_key(|(t, s, _)| (*t, *s));
                if self.queue.first().is_none_or(|(t, _, _)| *t > limit) {
                    self.now = self
                        .now
                        .max(limit.min(self.now + Duration::from_secs(7200)));
                    return;
                }
                let (t, _, ev) = self.queue.remove(0);
                self.now = t;
                self.runner_sees(&ev);
                self.step(ev);
            }
        }

        fn run(&mut self) {
            self.run_until(None);
        }

        /// The runner's news, seen by the world and then the deploy.
        fn event(&mut self, ev: Event) {
            self.runner_sees(&ev);
            self.step(ev);
        }

        fn step(&mut self, ev: Event) {
            let mut w = self.world();
            let (now, p) = (self.now, self.p.clone());
            let fx = self.deploy.as_mut().unwrap().step(ev, now, &p, &mut w);
            self.apply(fx);
            if self.strict {
                for (proc, floor) in &self.floor {
                    let healthy = self.healthy(proc, "");
                    assert!(healthy >= *floor, "{proc}: {healthy} < {floor} healthy");
                }
            }
        }

        /// The world changes that an event reports.
        fn runner_sees(&mut self, ev: &Event) {
            match ev {
                Event::Up { id, up_at } => {
                    if let Some(i) = self.world.get_mut(id) {
                        self.ups.insert(i.version);
                        i.state = InstanceState::Up;
                        i.up_at = Some(*up_at);
                    }
                }
                Event::Down { id, restarts } | Event::Crashed { id, restarts } => {
                    if let Some(i) = self.world.get_mut(id) {
                        i.state = if matches!(ev, Event::Down { .. }) {
                            InstanceState::Backoff
                        } else {
                            InstanceState::Crashed
                        };
                        i.restarts = *restarts;
                    }
                }
                Event::Stopped { id } => {
                    self.world.remove(id);
                }
                _ => {}
            }
        }

        fn healthy(&self, proc: &str, except: &str) -> u32 {
            let draining = self
                .deploy
                .as_ref()
                .map(|d| d.draining())
                .unwrap_or_default();
            self.world
                .values()
                .filter(|i| i.proc == proc && i.id != except && i.state == InstanceState::Up)
                .filter(|i| !draining.contains(&i.id))
                .count() as u32
        }

        fn apply(&mut self, fx: Vec<Effect>) {
            for e in fx {
                self.log.push((self.now, e.clone()));
                match e {
                    Effect::StartInstance(s) => self.start(s),
                    Effect::DrainInstance { id } => {
                        self.check_invariant(&id);
                        if self.confirm_drains {
                            self.at(Sim::secs(1), Event::DrainConfirmed { id });
                        }
                    }
                    Effect::StopInstance(s) => {
                        assert_eq!(s.token, self.token);
                        let draining = self
                            .deploy
                            .as_ref()
                            .is_some_and(|d| d.draining().contains(&s.id));
                        if !draining {
                            self.check_invariant(&s.id);
                        }
                        let i = self
                            .world
                            .get_mut(&s.id)
                            .expect("stop of an unknown instance");
                        assert!(!i.state.is_gone(), "{} stopped twice", s.id);
                        i.state = InstanceState::Stopping;
                        self.at(Sim::secs(1), Event::Stopped { id: s.id });
                    }
                    Effect::After { delay, timer } => self.at(delay, Event::Timer(timer)),
                    _ => {}
                }
            }
        }

        /// Taking `id` out of service leaves `floor` healthy of its process type.
        fn check_invariant(&self, id: &str) {
            let i = &self.world[id];
            if i.state != InstanceState::Up || !is_routed(&i.proc) {
                return;
            }
            let floor = self.floor.get(&i.proc).copied().unwrap_or(0);
            let left = self.healthy(&i.proc, id);
            assert!(
                left >= floor,
                "{id} taken out with {left} < {floor} healthy left"
            );
        }

        fn start(&mut self, s: StartInstance) {
            assert_eq!(s.token, self.token);
            assert!(!self.world.contains_key(&s.id), "duplicate id {}", s.id);
            let i = Instance {
                id: s.id.clone(),
                app: s.app.clone(),
                proc: s.proc.clone(),
                version: s.version,
                node: s.node.clone(),
                addr: is_routed(&s.proc).then(|| format!("{}:{}", s.node, 6000 + self.seq)),
                state: InstanceState::Starting,
                up_at: None,
                memory_mb: s.memory_mb,
                token: s.token,
                owner: Owner::Scheduler,
                restarts: 0,
            };
            self.world.insert(s.id.clone(), i);
            let id = s.id;
            let up = self.now + Sim::secs(2);
            match self.behave[&s.version] {
                Behaviour::Good => self.at(Sim::secs(2), Event::Up { id, up_at: up }),
                Behaviour::NeverUp => {}
                Behaviour::UpThenCrash { after } => {
                    self.at(
                        Sim::secs(2),
                        Event::Up {
                            id: id.clone(),
                            up_at: up,
                        },
                    );
                    self.at(Sim::secs(2) + after, Event::Crashed { id, restarts: 5 });
                }
                Behaviour::Flapping => {
                    for k in 0..10u32 {
                        let t = Sim::secs(2 + 3 * u64::from(k));
                        self.at(
                            t,
                            Event::Up {
                                id: id.clone(),
                                up_at: self.now + t,
                            },
                        );
                        self.at(
                            t + Sim::secs(1),
                            Event::Down {
                                id: id.clone(),
                                restarts: k + 1,
                            },
                        );
                    }
                }
            }
        }

        fn finished(&self) -> Vec<(u64, Outcome)> {
            self.log
                .iter()
                .filter_map(|(_, e)| match e {
                    Effect::Finished { version, outcome } => Some((*version, *outcome)),
                    _ => None,
                })
                .collect()
        }

        fn effects(&self, pred: impl Fn(&Effect) -> bool) -> Vec<(Instant, Effect)> {
            self.log.iter().filter(|(_, e)| pred(e)).cloned().collect()
        }

        /// Living instances (not stopping) per (proc, version).
        fn counts(&self) -> BTreeMap<(String, u64), u32> {
            let mut m = BTreeMap::new();
            for i in self.world.values().filter(|i| !i.state.is_gone()) {
                *m.entry((i.proc.clone(), i.version)).or_insert(0) += 1;
            }
            m
        }

        fn ever_up(&self, version: u64) -> bool {
            self.ups.contains(&version)
        }
    }

    fn counts(list: &[(&str, u64, u32)]) -> BTreeMap<(String, u64), u32> {
        list.iter()
            .map(|(p, v, n)| ((p.to_string(), *v), *n))
            .collect()
    }

    /// The happy path for 1 and 4 web instances: surge 1 (never more than
    /// formation + 1 living), each old instance drained only after a new one
    /// stayed up `min_healthy` from its `up_at`, then live, then succeeded.
    #[test]
    fn happy_path_rolls_one_at_a_time() {
        for q in [1, 4] {
            let f = formation(q, 0);
            let mut sim = Sim::new(&f, Behaviour::Good);
            sim.begin(Some(target(1, &f)), target(2, &f), Behaviour::Good, false);
            let mut most = 0;
            while sim.deploy.as_ref().unwrap().phase() != Phase::Done {
                sim.run_until(Some(Duration::from_millis(500)));
                most = most.max(sim.counts().values().sum::<u32>());
            }
            assert!(most <= q + 1, "q={q}: {most} living at once");
            assert_eq!(sim.finished(), [(2, Outcome::Succeeded)], "q={q}");
            assert_eq!(sim.counts(), counts(&[("web", 2, q)]), "q={q}");
            let drains = sim.effects(|e| matches!(e, Effect::DrainInstance { .. }));
            let starts = sim.effects(|e| matches!(e, Effect::StartInstance(_)));
            assert_eq!(
                (drains.len(), starts.len()),
                (q as usize, q as usize),
                "q={q}"
            );
            // The k-th drain comes min_healthy after the k-th new instance's up_at
            // (started at s, up at s + 2 s).
            for (k, ((started, _), (drained, _))) in starts.iter().zip(&drains).enumerate() {
                let up_at = *started + Sim::secs(2);
                assert!(*drained >= up_at + sim.p.min_healthy, "q={q} drain {k}");
            }
            let live = sim.effects(|e| matches!(e, Effect::Live { version: 2 }));
            assert_eq!(live.len(), 1);
            // Succeeded only after the watch window.
            let (done_at, _) = sim.effects(|e| matches!(e, Effect::Finished { .. }))[0].clone();
            assert_eq!(done_at, live[0].0 + sim.p.watch_window);
        }
    }

    #[test]
    fn min_healthy_counts_from_up_at_not_from_the_event() {
        let f = formation(1, 0);
        let mut sim = Sim::new(&f, Behaviour::Good);
        sim.begin(
            Some(target(1, &f)),
            target(2, &f),
            Behaviour::NeverUp,
            false,
        );
        let id = "app.web.v2.t2.1".to_string();
        // The runner reports late: up 8 s ago.
        let up_at = sim.now - Sim::secs(8);
        sim.event(Event::Up { id, up_at });
        let (_, t) = sim.effects(|e| {
            matches!(
                e,
                Effect::After {
                    timer: Timer::Settled { .. },
                    ..
                }
            )
        })[0]
            .clone();
        assert!(matches!(t, Effect::After { delay, .. } if delay == Sim::secs(2)));
        sim.run_until(Some(Sim::secs(1)));
        assert!(sim
            .effects(|e| matches!(e, Effect::DrainInstance { .. }))
            .is_empty());
        sim.run_until(Some(Sim::secs(1)));
        assert_eq!(
            sim.effects(|e| matches!(e, Effect::DrainInstance { .. }))
                .len(),
            1
        );
    }

    #[test]
    fn a_release_that_never_binds_is_rolled_back_and_never_routed() {
        for q in [1, 3] {
            let f = formation(q, 1);
            let mut sim = Sim::new(&f, Behaviour::Good);
            sim.begin(
                Some(target(1, &f)),
                target(2, &f),
                Behaviour::NeverUp,
                false,
            );
            sim.run();
            assert_eq!(sim.finished(), [(2, Outcome::RolledBack)]);
            assert_eq!(
                sim.effects(|e| matches!(e, Effect::Rollback { to: 1 }))
                    .len(),
                1
            );
            let alert = sim.effects(
                |e| matches!(e, Effect::Alert { reason } if reason.contains("not up within 30s")),
            );
            assert_eq!(alert.len(), 1);
            assert!(!sim.ever_up(2));
            assert!(sim
                .effects(|e| matches!(e, Effect::DrainInstance { .. }))
                .is_empty());
            assert_eq!(sim.counts(), counts(&[("web", 1, q), ("worker", 1, 1)]));
        }
    }

    #[test]
    fn a_release_that_crashes_within_the_watch_window_is_rolled_back() {
        let f = formation(2, 0);
        let mut sim = Sim::new(&f, Behaviour::Good);
        sim.strict = false;
        // Up, settled after 10 s, live after both; crashes 40 s after its up.
        let b = Behaviour::UpThenCrash {
            after: Sim::secs(40),
        };
        sim.begin(Some(target(1, &f)), target(2, &f), b, false);
        sim.run();
        assert_eq!(
            sim.effects(|e| matches!(e, Effect::Live { version: 2 }))
                .len(),
            1
        );
        assert_eq!(sim.finished(), [(2, Outcome::RolledBack)]);
        assert_eq!(
            sim.effects(|e| matches!(e, Effect::Rollback { to: 1 }))
                .len(),
            1
        );
        assert_eq!(sim.counts(), counts(&[("web", 1, 2)]));
    }

    #[test]
    fn restarts_inside_the_deploy_are_a_crash_loop() {
        let f = formation(2, 0);
        let mut sim = Sim::new(&f, Behaviour::Good);
        sim.strict = false;
        sim.begin(
            Some(target(1, &f)),
            target(2, &f),
            Behaviour::Flapping,
            false,
        );
        sim.run();
        assert_eq!(sim.finished(), [(2, Outcome::RolledBack)]);
        let alert = sim.effects(
            |e| matches!(e, Effect::Alert { reason } if reason.contains("restarted 3 times")),
        );
        assert_eq!(alert.len(), 1);
        assert_eq!(sim.counts(), counts(&[("web", 1, 2)]));
    }

    #[test]
    fn a_newer_release_cancels_an_older_deploy_and_its_instances_go() {
        // At each moment the newer release arrives: before v2 is up, while it
        // settles, after the first old instance went.
        for wait in [1, 5, 20] {
            let f = formation(2, 0);
            let mut sim = Sim::new(&f, Behaviour::Good);
            sim.begin(Some(target(1, &f)), target(2, &f), Behaviour::Good, false);
            sim.run_until(Some(Sim::secs(wait)));
            sim.behave.insert(3, Behaviour::Good);
            sim.step(Event::Newer {
                target: target(3, &f),
                restart: false,
            });
            sim.run();
            assert_eq!(
                sim.finished(),
                [(2, Outcome::Cancelled), (3, Outcome::Succeeded)],
                "wait {wait}"
            );
            assert_eq!(sim.counts(), counts(&[("web", 3, 2)]), "wait {wait}");
        }
    }

    #[test]
    fn the_progress_deadline_ends_a_slow_rollout_with_a_rollback() {
        let f = formation(4, 0);
        let mut sim = Sim::new(&f, Behaviour::Good);
        sim.p.progress_deadline = Sim::secs(30);
        sim.begin(Some(target(1, &f)), target(2, &f), Behaviour::Good, false);
        sim.run();
        assert_eq!(sim.finished(), [(2, Outcome::RolledBack)]);
        let alert = sim.effects(
            |e| matches!(e, Effect::Alert { reason } if reason.contains("not done within 30s")),
        );
        assert_eq!(alert.len(), 1);
        assert_eq!(sim.counts(), counts(&[("web", 1, 4)]));
    }

    #[test]
    fn a_rollback_that_cannot_finish_fails() {
        let f = formation(1, 0);
        let mut sim = Sim::new(&f, Behaviour::NeverUp);
        sim.strict = false;
        // v2 fails after v1's one instance was replaced; the restored v1 never binds.
        let b = Behaviour::UpThenCrash {
            after: Sim::secs(30),
        };
        sim.begin(Some(target(1, &f)), target(2, &f), b, false);
        sim.run();
        assert_eq!(sim.finished(), [(2, Outcome::Failed)]);
        let alerts = sim.effects(|e| matches!(e, Effect::Alert { .. }));
        assert_eq!(alerts.len(), 2, "{alerts:?}");
    }

    #[test]
    fn a_first_release_starts_everything_at_once_and_fails_without_a_rollback() {
        let f = formation(3, 1);
        for (b, want) in [
            (Behaviour::Good, Outcome::Succeeded),
            (Behaviour::NeverUp, Outcome::Failed),
        ] {
            let mut sim = Sim::new(&Formation::new(), Behaviour::Good);
            sim.begin(None, target(1, &f), b, false);
            assert_eq!(
                sim.effects(|e| matches!(e, Effect::StartInstance(_))).len(),
                4
            );
            sim.run();
            assert_eq!(sim.finished(), [(1, want)]);
            assert!(sim
                .effects(|e| matches!(e, Effect::Rollback { .. }))
                .is_empty());
            let left = if want == Outcome::Failed {
                counts(&[])
            } else {
                counts(&[("web", 1, 3), ("worker", 1, 1)])
            };
            assert_eq!(sim.counts(), left);
        }
    }

    #[test]
    fn a_restart_replaces_every_instance_of_the_same_release() {
        let f = formation(2, 1);
        let mut sim = Sim::new(&f, Behaviour::Good);
        let before: BTreeSet<InstanceId> = sim.world.keys().cloned().collect();
        sim.begin(Some(target(1, &f)), target(1, &f), Behaviour::Good, true);
        sim.run();
        assert_eq!(sim.finished(), [(1, Outcome::Succeeded)]);
        assert_eq!(sim.counts(), counts(&[("web", 1, 2), ("worker", 1, 1)]));
        assert!(sim.world.keys().all(|id| !before.contains(id)));
        // Workers take no traffic: stopped without a drain.
        let drained = sim.effects(|e| matches!(e, Effect::DrainInstance { .. }));
        assert_eq!(drained.len(), 2);
        assert!(drained.iter().all(|(_, e)| kind(e).contains(".web.")));
    }

    #[test]
    fn a_formation_change_with_the_release_converges_to_the_new_formation() {
        let old = formation(1, 2);
        let new = formation(3, 0);
        let mut sim = Sim::new(&old, Behaviour::Good);
        // Never fewer than the smaller of the two formations.
        sim.floor = BTreeMap::from([("web".into(), 1), ("worker".into(), 0)]);
        sim.begin(
            Some(target(1, &old)),
            target(2, &new),
            Behaviour::Good,
            false,
        );
        sim.run();
        assert_eq!(sim.finished(), [(2, Outcome::Succeeded)]);
        assert_eq!(sim.counts(), counts(&[("web", 2, 3)]));
    }

    #[test]
    fn drains_end_by_the_drain_period_without_a_confirmation() {
        let f = formation(1, 0);
        let mut sim = Sim::new(&f, Behaviour::Good);
        sim.confirm_drains = false;
        sim.begin(Some(target(1, &f)), target(2, &f), Behaviour::Good, false);
        sim.run();
        let (drained, _) = sim.effects(|e| matches!(e, Effect::DrainInstance { .. }))[0].clone();
        let (stopped, _) = sim.effects(|e| matches!(e, Effect::StopInstance(_)))[0].clone();
        assert_eq!(stopped, drained + sim.p.drain_period);
        assert_eq!(sim.finished(), [(2, Outcome::Succeeded)]);
    }

    #[test]
    fn a_lost_instance_is_replaced_during_the_deploy() {
        let f = formation(2, 0);
        let mut sim = Sim::new(&f, Behaviour::Good);
        sim.strict = false;
        sim.begin(Some(target(1, &f)), target(2, &f), Behaviour::Good, false);
        sim.run_until(Some(Sim::secs(20)));
        // The node of one old instance dies.
        let lost = sim
            .world
            .values()
            .find(|i| i.version == 1 && !i.state.is_gone())
            .map(|i| i.id.clone())
            .unwrap();
        sim.world.remove(&lost);
        sim.floor.insert("web".into(), 1);
        sim.step(Event::Lost { id: lost });
        sim.run();
        assert_eq!(sim.finished(), [(2, Outcome::Succeeded)]);
        assert_eq!(sim.counts(), counts(&[("web", 2, 2)]));
    }

    #[test]
    fn no_room_for_the_surge_instance_rolls_back_at_once() {
        let f = formation(3, 0);
        let mut sim = Sim::new(&f, Behaviour::Good);
        for n in sim.reg.values_mut() {
            n.offer_memory_mb = 256;
        }
        sim.begin(Some(target(1, &f)), target(2, &f), Behaviour::Good, false);
        assert_eq!(sim.finished(), [(2, Outcome::RolledBack)]);
        assert!(sim
            .effects(|e| matches!(e, Effect::StartInstance(_)))
            .is_empty());
        let alert = sim.effects(
            |e| matches!(e, Effect::Alert { reason } if reason.contains("no runner has 256 MB")),
        );
        assert_eq!(alert.len(), 1);
    }

    #[test]
    fn a_pending_release_asks_for_a_rollout_of_its_process_types() {
        let release = |version: u64, procs: &[&str]| Release {
            version,
            slug: "s".into(),
            process_types: procs
                .iter()
                .map(|p| (p.to_string(), "run".to_string()))
                .collect(),
            env: BTreeMap::new(),
        };
        let mut app = DesiredApp {
            name: "app".into(),
            release: Some(release(1, &["web", "worker"])),
            pending: None,
            formation: formation(2, 1),
            domains: vec![],
            health: BTreeMap::new(),
        };
        assert_eq!(rollout_for(&app), None);
        app.pending = Some(release(2, &["web"]));
        let r = rollout_for(&app).unwrap();
        assert_eq!(r.live, Some(target(1, &formation(2, 1))));
        assert_eq!(r.target, target(2, &formation(2, 0)));
        app.release = None;
        assert_eq!(rollout_for(&app).unwrap().live, None);
    }

    fn kind(e: &Effect) -> String {
        match e {
            Effect::StartInstance(s) => format!("start v{}", s.version),
            Effect::DrainInstance { id } => format!("drain {id}"),
            Effect::StopInstance(s) => format!("stop {}", s.id),
            Effect::PublishRoutes => "routes".into(),
            Effect::After { timer, .. } => format!("after {timer:?}"),
            Effect::Rollback { to } => format!("rollback to v{to}"),
            Effect::Alert { .. } => "alert".into(),
            Effect::Live { version } => format!("live v{version}"),
            Effect::Finished { version, outcome } => format!("v{version} {outcome:?}"),
        }
    }

    /// Table: one event in a deploy of web=2 from v1 to v2, 3 s in (the first
    /// v2 instance up for 1 s, not settled) → the effects.
    #[test]
    fn one_event_in_mid_deploy_table() {
        const OLD: &str = "app.web.v1.t1.1";
        const NEW: &str = "app.web.v2.t2.1";
        let id = |s: &str| s.to_string();
        let f = formation(2, 0);
        let cases: Vec<(&str, Event, Vec<&str>)> = vec![
            (
                "unknown instance up",
                Event::Up {
                    id: id("x"),
                    up_at: Instant::now(),
                },
                vec![],
            ),
            (
                "deadline of an up instance",
                Event::Timer(Timer::HealthyBy { id: id(NEW) }),
                vec![],
            ),
            (
                "an older round's deadline",
                Event::Timer(Timer::Progress { round: 0 }),
                vec![],
            ),
            (
                "drain over, none under way",
                Event::Timer(Timer::DrainOver { id: id(OLD) }),
                vec![],
            ),
            (
                "drain confirmed, none under way",
                Event::DrainConfirmed { id: id(OLD) },
                vec![],
            ),
            (
                "settled timer too early",
                Event::Timer(Timer::Settled { id: id(NEW) }),
                vec![],
            ),
            (
                "an old instance crashes: stopped, not replaced while one is in flight",
                Event::Crashed {
                    id: id(OLD),
                    restarts: 5,
                },
                vec!["routes", "stop app.web.v1.t1.1"],
            ),
            (
                "the new one restarts, below the limit",
                Event::Down {
                    id: id(NEW),
                    restarts: 2,
                },
                vec!["routes"],
            ),
            (
                "the new one restarts, at the limit",
                Event::Down {
                    id: id(NEW),
                    restarts: 3,
                },
                vec![
                    "routes",
                    "alert",
                    "rollback to v1",
                    "after Progress { round: 2 }",
                    "stop app.web.v2.t2.1",
                    "v2 RolledBack",
                ],
            ),
            (
                "the new one crashes",
                Event::Crashed {
                    id: id(NEW),
                    restarts: 0,
                },
                vec![
                    "routes",
                    "alert",
                    "rollback to v1",
                    "after Progress { round: 2 }",
                    "stop app.web.v2.t2.1",
                    "v2 RolledBack",
                ],
            ),
            (
                "the progress deadline",
                Event::Timer(Timer::Progress { round: 1 }),
                vec![
                    "alert",
                    "rollback to v1",
                    "after Progress { round: 2 }",
                    "drain app.web.v2.t2.1",
                    "routes",
                    "after DrainOver { id: \"app.web.v2.t2.1\" }",
                ],
            ),
            (
                "the new one's node dies",
                Event::Lost { id: id(NEW) },
                vec![
                    "routes",
                    "start v2",
                    "after HealthyBy { id: \"app.web.v2.t2.2\" }",
                ],
            ),
            (
                "a newer release",
                Event::Newer {
                    target: target(3, &f),
                    restart: false,
                },
                vec![
                    "v2 Cancelled",
                    "after Progress { round: 2 }",
                    "drain app.web.v1.t1.1",
                    "routes",
                    "after DrainOver { id: \"app.web.v1.t1.1\" }",
                ],
            ),
        ];
        for (name, ev, want) in cases {
            let mut sim = Sim::new(&f, Behaviour::Good);
            sim.strict = false;
            sim.begin(Some(target(1, &f)), target(2, &f), Behaviour::Good, false);
            sim.run_until(Some(Sim::secs(3)));
            let before = sim.log.len();
            sim.event(ev);
            let got: Vec<String> = sim.log[before..].iter().map(|(_, e)| kind(e)).collect();
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn events_after_the_end_change_nothing() {
        let f = formation(1, 0);
        let mut sim = Sim::new(&f, Behaviour::Good);
        sim.begin(Some(target(1, &f)), target(2, &f), Behaviour::Good, false);
        sim.run();
        let n = sim.log.len();
        sim.step(Event::Crashed {
            id: "app.web.v2.t2.1".into(),
            restarts: 9,
        });
        sim.step(Event::Timer(Timer::Progress { round: 1 }));
        assert_eq!(sim.log.len(), n);
    }
}
