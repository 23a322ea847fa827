//! The whole cluster, each tick: desired state (the api's apps) × actual state
//! (the runners' instances) × the registry (nodes) → effects. Stateless: it
//! re-reads the world every time; the only memory it is given is the drains the
//! scheduler began. Apps with a deploy under way are the deploy's (see
//! `deploy`): the actor sends their lost instances to it as `Lost` events.
//!
//! Per app and process type, over the scheduler's instances not stopping and
//! not on a dead node (an operator's are never touched, nor counted):
//! - a drain older than `drain_period` ends in a stop;
//! - an instance of another release than the current one is retired;
//! - beyond the formation count, the extras are retired: first those on a node
//!   that came back less than `node_settle` ago (what it ran before it died was
//!   replaced meanwhile), then older tokens, then those not up, then those on
//!   the node most crowded with the process type;
//! - below it, new instances are placed (`placement`), and what cannot be is
//!   reported as "N of M placed".
//!
//! To retire is to drain an up `web` instance (its stop comes a drain period
//! later) and to stop anything else at once.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use crate::model::{
    is_routed, new_id, AppName, DesiredApp, Instance, InstanceId, InstanceState, Liveness, Owner,
    Policy, Registry, Shortfall, StartInstance, StopInstance, Token,
};
use crate::placement::Room;
use crate::routes::{self, RouteTable};

/// What a tick looks at.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    pub apps: &'a [DesiredApp],
    pub instances: &'a [Instance],
    pub registry: &'a Registry,
    /// Drains under way (reconcile's and the deploys'), and since when.
    pub draining: &'a BTreeMap<InstanceId, Instant>,
    /// Apps whose instances a deploy owns now.
    pub deploying: &'a BTreeSet<AppName>,
    pub token: Token,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    StartInstance(StartInstance),
    /// Mark it draining (the caller records the time); its stop comes later.
    DrainInstance {
        id: InstanceId,
    },
    StopInstance(StopInstance),
    /// The whole table, after this tick's drains and stops.
    PublishRoutes(RouteTable),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub effects: Vec<Effect>,
    /// Process types that could not be fully placed.
    pub shortfalls: Vec<Shortfall>,
}

pub fn reconcile(input: &Input, now: Instant, p: &Policy) -> Plan {
    let mut tick = Tick {
        input,
        now,
        p,
        room: Room::new(input.registry, input.instances, now, p),
        effects: Vec::new(),
        shortfalls: Vec::new(),
        drained: BTreeSet::new(),
        stopped: BTreeSet::new(),
    };
    let desired: BTreeMap<&str, &DesiredApp> =
        input.apps.iter().map(|a| (a.name.as_str(), a)).collect();
    let mut apps: BTreeSet<&str> = desired.keys().copied().collect();
    apps.extend(input.instances.iter().map(|i| i.app.as_str()));
    for app in apps {
        if !input.deploying.contains(app) {
            tick.app(app, desired.get(app).copied());
        }
    }
    let mut draining: BTreeSet<InstanceId> = input.draining.keys().cloned().collect();
    draining.extend(tick.drained.iter().cloned());
    let left: Vec<Instance> = input
        .instances
        .iter()
        .filter(|i| !tick.stopped.contains(&i.id))
        .cloned()
        .collect();
    let table = routes::table(input.token, input.apps, &left, input.registry, &draining);
    tick.effects.push(Effect::PublishRoutes(table));
    Plan {
        effects: tick.effects,
        shortfalls: tick.shortfalls,
    }
}

struct Tick<'a> {
    input: &'a Input<'a>,
    now: Instant,
    p: &'a Policy,
    room: Room,
    effects: Vec<Effect>,
    shortfalls: Vec<Shortfall>,
    drained: BTreeSet<InstanceId>,
    stopped: BTreeSet<InstanceId>,
}

impl<'a> Tick<'a> {
    fn liveness(&self, node: &str) -> Liveness {
        self.input
            .registry
            .get(node)
            .map_or(Liveness::Dead, |n| n.liveness)
    }

    /// The app's scheduler instances that count: not stopping, not on a dead node.
    fn instances(&self, app: &str) -> Vec<&'a Instance> {
        self.input
            .instances
            .iter()
            .filter(|i| i.app == app && i.owner == Owner::Scheduler && !i.state.is_gone())
            .filter(|i| self.liveness(&i.node) != Liveness::Dead)
            .collect()
    }

    fn app(&mut self, app: &str, desired: Option<&DesiredApp>) {
        let mut procs: BTreeMap<&str, Vec<&'a Instance>> = BTreeMap::new();
        for i in self.instances(app) {
            if let Some(since) = self.input.draining.get(&i.id) {
                if self.now.saturating_duration_since(*since) >= self.p.drain_period {
                    self.stop(i);
                }
            } else {
                procs.entry(i.proc.as_str()).or_default().push(i);
            }
        }
        let release = desired.and_then(|d| d.release.as_ref());
        let (Some(desired), Some(release)) = (desired, release) else {
            // Deleted, or never released: nothing of it should run.
            for i in procs.into_values().flatten() {
                self.retire(i);
            }
            return;
        };
        for proc in desired.formation.keys() {
            procs.entry(proc.as_str()).or_default();
        }
        for (proc, list) in procs {
            let (current, other): (Vec<_>, Vec<_>) =
                list.into_iter().partition(|i| i.version == release.version);
            for i in other {
                self.retire(i);
            }
            let scale = desired.formation.get(proc).copied();
            let want = match scale {
                Some(s) if release.process_types.contains_key(proc) => s.quantity,
                _ => 0,
            };
            let have = current.len() as u32;
            if have > want {
                for i in self.extras(current, want) {
                    self.retire(i);
                }
            } else if have < want {
                let memory_mb = scale.map_or(0, |s| s.memory_mb);
                self.place(app, proc, release.version, memory_mb, have, want);
            }
        }
    }

    /// The instances beyond `want`, in the order they should go.
    fn extras(&self, mut list: Vec<&'a Instance>, want: u32) -> Vec<&'a Instance> {
        let mut crowd: BTreeMap<&str, u32> = BTreeMap::new();
        for i in &list {
            *crowd.entry(i.node.as_str()).or_insert(0) += 1;
        }
        list.sort_by_key(|i| {
            let settled = self.input.registry.get(&i.node).is_some_and(|n| {
                self.now.saturating_duration_since(n.alive_since) >= self.p.node_settle
            });
            (
                settled,
                i.token,
                i.state == InstanceState::Up,
                std::cmp::Reverse(crowd[i.node.as_str()]),
                std::cmp::Reverse(i.id.clone()),
            )
        });
        let extra = list.len() - want as usize;
        list.truncate(extra);
        list
    }

    fn place(&mut self, app: &str, proc: &str, version: u64, memory_mb: u64, have: u32, want: u32) {
        let token = self.input.token;
        let nodes = self.room.place_n(app, proc, memory_mb, want - have);
        let mut taken: Vec<String> = self.input.instances.iter().map(|i| i.id.clone()).collect();
        for node in &nodes {
            let id = new_id(app, proc, version, token, taken.iter().map(String::as_str));
            taken.push(id.clone());
            self.effects.push(Effect::StartInstance(StartInstance {
                id,
                app: app.to_string(),
                proc: proc.to_string(),
                version,
                node: node.clone(),
                memory_mb,
                token,
            }));
        }
        let placed = have + nodes.len() as u32;
        if placed < want {
            self.shortfalls.push(Shortfall {
                app: app.to_string(),
                proc: proc.to_string(),
                placed,
                wanted: want,
            });
        }
    }

    fn retire(&mut self, i: &Instance) {
        // (Instances on dead nodes never get here: they are not counted.)
        if is_routed(&i.proc) && i.state == InstanceState::Up {
            self.drained.insert(i.id.clone());
            self.effects
                .push(Effect::DrainInstance { id: i.id.clone() });
        } else {
            self.stop(i);
        }
    }

    fn stop(&mut self, i: &Instance) {
        self.stopped.insert(i.id.clone());
        self.effects.push(Effect::StopInstance(StopInstance {
            id: i.id.clone(),
            token: self.input.token,
        }));
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::model::{Formation, Release, Scale};
    use crate::placement::tests::{inst, nodes, policy};

    fn app(name: &str, version: u64, web: u32, worker: u32) -> DesiredApp {
        let mut formation = Formation::new();
        let mut process_types = BTreeMap::new();
        for (proc, quantity) in [("web", web), ("worker", worker)] {
            process_types.insert(proc.to_string(), format!("run {proc}"));
            formation.insert(
                proc.to_string(),
                Scale {
                    quantity,
                    memory_mb: 256,
                },
            );
        }
        DesiredApp {
            name: name.into(),
            release: Some(Release {
                version,
                slug: "ab".repeat(32),
                process_types,
                env: BTreeMap::new(),
            }),
            pending: None,
            formation,
            domains: vec![format!("{name}.example")],
            health: BTreeMap::new(),
        }
    }

    /// A cluster of three nodes, alive for an hour, and a tick loop that applies
    /// the effects as runners and balancers would (starts come up at once,
    /// stops are done by the next tick).
    struct Cluster {
        now: Instant,
        p: Policy,
        token: Token,
        reg: Registry,
        apps: Vec<DesiredApp>,
        instances: Vec<Instance>,
        draining: BTreeMap<InstanceId, Instant>,
        deploying: BTreeSet<AppName>,
    }

    impl Cluster {
        fn new(apps: Vec<DesiredApp>) -> Cluster {
            let t0 = Instant::now();
            Cluster {
                now: t0 + Duration::from_secs(3600),
                p: policy(),
                token: 5,
                reg: nodes(t0, &["n1", "n2", "n3"], 4096),
                apps,
                instances: Vec::new(),
                draining: BTreeMap::new(),
                deploying: BTreeSet::new(),
            }
        }

        fn add(&mut self, id: &str, proc: &str, node: &str, version: u64) -> &mut Instance {
            let mut i = inst(id, "shop", proc, node, 256);
            i.version = version;
            if !is_routed(proc) {
                i.addr = None;
            }
            self.instances.push(i);
            self.instances.last_mut().unwrap()
        }

        fn plan(&self) -> Plan {
            let input = Input {
                apps: &self.apps,
                instances: &self.instances,
                registry: &self.reg,
                draining: &self.draining,
                deploying: &self.deploying,
                token: self.token,
            };
            reconcile(&input, self.now, &self.p)
        }

        /// One tick, its effects applied; returns them.
        fn tick(&mut self) -> Vec<Effect> {
            let plan = self.plan();
            for e in &plan.effects {
                match e {
                    Effect::StartInstance(s) => {
                        assert_eq!(s.token, self.token);
                        assert!(self.instances.iter().all(|i| i.id != s.id), "duplicate id");
                        let mut i = inst(&s.id, &s.app, &s.proc, &s.node, s.memory_mb);
                        i.version = s.version;
                        i.token = s.token;
                        self.instances.push(i);
                    }
                    Effect::DrainInstance { id } => {
                        assert!(self.draining.insert(id.clone(), self.now).is_none());
                    }
                    Effect::StopInstance(s) => {
                        assert_eq!(s.token, self.token);
                        let i = self.instances.iter_mut().find(|i| i.id == s.id).unwrap();
                        assert!(!i.state.is_gone(), "{} stopped twice", s.id);
                        i.state = InstanceState::Stopped;
                        self.draining.remove(&s.id);
                    }
                    Effect::PublishRoutes(t) => assert_eq!(t.token, self.token),
                }
            }
            plan.effects
        }

        /// Ticks (a drain period apart) until a tick changes nothing and no
        /// drain is under way.
        fn settle(&mut self) {
            for _ in 0..10 {
                if self.tick().len() == 1 && self.draining.is_empty() {
                    return;
                }
                self.now += self.p.drain_period;
            }
            panic!("no steady state");
        }

        /// Living scheduler instances per (proc, node).
        fn placed(&self) -> BTreeMap<(String, String), u32> {
            let mut m = BTreeMap::new();
            for i in &self.instances {
                if !i.state.is_gone() && i.owner == Owner::Scheduler {
                    *m.entry((i.proc.clone(), i.node.clone())).or_insert(0) += 1;
                }
            }
            m
        }

        fn count(&self, proc: &str, alive_only: bool) -> u32 {
            self.instances
                .iter()
                .filter(|i| i.proc == proc && !i.state.is_gone() && i.owner == Owner::Scheduler)
                .filter(|i| !alive_only || self.reg[&i.node].liveness != Liveness::Dead)
                .count() as u32
        }
    }

    fn starts(fx: &[Effect]) -> Vec<&StartInstance> {
        fx.iter()
            .filter_map(|e| match e {
                Effect::StartInstance(s) => Some(s),
                _ => None,
            })
            .collect()
    }

    fn stops(fx: &[Effect]) -> Vec<&str> {
        fx.iter()
            .filter_map(|e| match e {
                Effect::StopInstance(s) => Some(s.id.as_str()),
                _ => None,
            })
            .collect()
    }

    fn drains(fx: &[Effect]) -> Vec<&str> {
        fx.iter()
            .filter_map(|e| match e {
                Effect::DrainInstance { id } => Some(id.as_str()),
                _ => None,
            })
            .collect()
    }

    fn table(fx: &[Effect]) -> &RouteTable {
        match fx.last() {
            Some(Effect::PublishRoutes(t)) => t,
            other => panic!("no table last: {other:?}"),
        }
    }

    /// Table: (web, worker) before → after; each converges with counts equal to
    /// the formation, spread evenly, idempotently.
    #[test]
    fn scale_up_and_down_table() {
        let cases = [
            (0, 0, 3, 1),
            (0, 0, 4, 0),
            (3, 1, 5, 2),
            (4, 2, 1, 0),
            (2, 2, 0, 0),
        ];
        for (web0, worker0, web, worker) in cases {
            let mut c = Cluster::new(vec![app("shop", 1, web0, worker0)]);
            c.settle();
            c.apps = vec![app("shop", 1, web, worker)];
            c.settle();
            let case = format!("{web0}/{worker0} -> {web}/{worker}");
            assert_eq!(
                (c.count("web", false), c.count("worker", false)),
                (web, worker),
                "{case}"
            );
            for (proc, want) in [("web", web), ("worker", worker)] {
                let per_node: Vec<u32> = ["n1", "n2", "n3"]
                    .iter()
                    .map(|n| {
                        c.placed()
                            .get(&(proc.to_string(), n.to_string()))
                            .copied()
                            .unwrap_or(0)
                    })
                    .collect();
                let (lo, hi) = (
                    per_node.iter().min().unwrap(),
                    per_node.iter().max().unwrap(),
                );
                assert!(
                    hi - lo <= 1,
                    "{case}: {proc} spread {per_node:?} for {want}"
                );
            }
            assert_eq!(c.tick().len(), 1, "{case}: not steady");
        }
    }

    #[test]
    fn scaling_down_drains_web_first_and_stops_workers_at_once() {
        let mut c = Cluster::new(vec![app("shop", 1, 1, 1)]);
        c.add("w1", "web", "n1", 1);
        c.add("w2", "web", "n2", 1);
        c.add("k1", "worker", "n1", 1);
        c.add("k2", "worker", "n2", 1);
        let fx = c.tick();
        assert_eq!(drains(&fx), ["w2"]);
        assert_eq!(stops(&fx), ["k2"]);
        let backends = &table(&fx).apps[0].backends;
        assert_eq!(
            backends
                .iter()
                .map(|b| (b.id.as_str(), b.draining))
                .collect::<Vec<_>>(),
            [("w1", false), ("w2", true)]
        );
        // Within the drain period nothing more happens; after it, the stop.
        c.now += c.p.drain_period - Duration::from_millis(1);
        assert_eq!(c.tick().len(), 1);
        c.now += Duration::from_millis(1);
        let fx = c.tick();
        assert_eq!(stops(&fx), ["w2"]);
        assert_eq!(table(&fx).apps[0].backends.len(), 1);
    }

    #[test]
    fn a_dead_nodes_instances_are_replaced_and_unrouted_then_stopped_when_it_returns() {
        // Same token (the leader lived through it) and an older one (a new leader).
        for token in [5, 4] {
            let mut c = Cluster::new(vec![app("shop", 1, 3, 1)]);
            c.settle();
            assert_eq!(c.placed().len(), 4);
            for i in c.instances.iter_mut() {
                i.token = token;
            }
            let on_n3: Vec<String> = c
                .instances
                .iter()
                .filter(|i| i.node == "n3")
                .map(|i| i.id.clone())
                .collect();
            assert!(!on_n3.is_empty());
            // n3 dies: what it ran is placed on the others; nothing is sent to it.
            c.reg.get_mut("n3").unwrap().liveness = Liveness::Dead;
            let fx = c.tick();
            assert!(stops(&fx).is_empty() && drains(&fx).is_empty());
            assert_eq!(starts(&fx).len(), on_n3.len());
            assert!(starts(&fx).iter().all(|s| s.node != "n3"));
            let routed: Vec<&str> = table(&fx).apps[0]
                .backends
                .iter()
                .map(|b| b.id.as_str())
                .collect();
            assert!(on_n3.iter().all(|id| !routed.contains(&id.as_str())));
            assert_eq!((c.count("web", true), c.count("worker", true)), (3, 1));
            c.settle();
            // n3 returns: its old instances go (drained first if web and up),
            // and it gets no new work while it settles.
            c.now += Duration::from_secs(1);
            let n3 = c.reg.get_mut("n3").unwrap();
            n3.liveness = Liveness::Alive;
            n3.alive_since = c.now;
            let fx = c.tick();
            assert!(starts(&fx).is_empty());
            let gone: BTreeSet<&str> = drains(&fx).into_iter().chain(stops(&fx)).collect();
            assert_eq!(
                gone,
                on_n3.iter().map(String::as_str).collect(),
                "token {token}"
            );
            c.settle();
            assert_eq!(
                (c.count("web", false), c.count("worker", false)),
                (3, 1),
                "token {token}"
            );
            assert!(c
                .instances
                .iter()
                .filter(|i| i.node == "n3")
                .all(|i| i.state.is_gone()));
        }
    }

    #[test]
    fn operator_instances_are_never_touched_nor_counted() {
        let mut c = Cluster::new(vec![app("shop", 2, 1, 0)]);
        // An operator's old-release web, an operator's extra worker, on every node.
        for (k, node) in ["n1", "n2", "n3"].iter().enumerate() {
            c.add(&format!("op{k}"), "web", node, 1).owner = Owner::Operator;
            c.add(&format!("opw{k}"), "worker", node, 2).owner = Owner::Operator;
        }
        let fx = c.tick();
        assert_eq!(starts(&fx).len(), 1);
        assert!(fx.iter().all(|e| match e {
            Effect::DrainInstance { id } => !id.starts_with("op"),
            Effect::StopInstance(s) => !s.id.starts_with("op"),
            _ => true,
        }));
        c.settle();
        let ops = c.instances.iter().filter(|i| i.owner == Owner::Operator);
        assert!(ops.clone().all(|i| i.state == InstanceState::Up));
        assert_eq!(ops.count(), 6);
        // Nor routed by the scheduler.
        let fx = c.tick();
        assert_eq!(table(&fx).apps[0].backends.len(), 1);
    }

    #[test]
    fn other_releases_and_deleted_apps_are_retired() {
        let mut c = Cluster::new(vec![app("shop", 2, 1, 0)]);
        c.add("old-web", "web", "n1", 1);
        c.add("old-worker", "worker", "n1", 1);
        let mut gone = inst("gone-web", "gone", "web", "n2", 256);
        gone.state = InstanceState::Backoff;
        c.instances.push(gone);
        let fx = c.tick();
        assert_eq!(drains(&fx), ["old-web"]);
        assert_eq!(stops(&fx), ["gone-web", "old-worker"]);
        assert_eq!(starts(&fx).len(), 1);
        assert_eq!(starts(&fx)[0].version, 2);
    }

    #[test]
    fn apps_being_deployed_are_left_to_their_deploy() {
        let mut c = Cluster::new(vec![app("shop", 2, 1, 0)]);
        c.add("old-web", "web", "n1", 1);
        c.add("surge", "web", "n2", 2);
        c.deploying.insert("shop".into());
        let fx = c.tick();
        assert_eq!(fx.len(), 1, "{fx:?}");
        // Its instances are still routed.
        assert_eq!(table(&fx).apps[0].backends.len(), 2);
    }

    #[test]
    fn what_cannot_be_placed_is_reported_as_n_of_m() {
        let mut c = Cluster::new(vec![app("shop", 1, 5, 0)]);
        for n in c.reg.values_mut() {
            n.offer_memory_mb = 512;
        }
        let plan = c.plan();
        assert_eq!(starts(&plan.effects).len(), 5);
        assert!(plan.shortfalls.is_empty());
        let mut c = Cluster::new(vec![app("shop", 1, 7, 0)]);
        for n in c.reg.values_mut() {
            n.offer_memory_mb = 512;
        }
        let plan = c.plan();
        assert_eq!(starts(&plan.effects).len(), 6);
        assert_eq!(plan.shortfalls.len(), 1);
        assert_eq!(
            (plan.shortfalls[0].placed, plan.shortfalls[0].wanted),
            (6, 7)
        );
    }

    /// Table: which of two web instances goes when the formation is 1, by the
    /// first rule that tells them apart (n3 came back 1 s ago; n1 is crowded).
    #[test]
    fn which_extra_goes_first_table() {
        type Case = (
            &'static str,
            (&'static str, Token, InstanceState),
            (&'static str, Token, InstanceState),
            &'static str,
        );
        use InstanceState::{Backoff, Up};
        let cases: &[Case] = &[
            ("on a returned node", ("n2", 5, Up), ("n3", 5, Up), "b"),
            ("returned beats token", ("n2", 4, Up), ("n3", 5, Up), "b"),
            ("older token", ("n2", 5, Up), ("n1", 4, Up), "b"),
            ("token beats up", ("n2", 4, Up), ("n1", 5, Backoff), "a"),
            ("not up", ("n2", 5, Up), ("n1", 5, Backoff), "b"),
            ("crowded node", ("n2", 5, Up), ("n1", 5, Up), "b"),
        ];
        for (name, a, b, want) in cases {
            let mut c = Cluster::new(vec![app("shop", 1, 1, 0)]);
            for (id, (node, token, state)) in [("a", a), ("b", b)] {
                let i = c.add(id, "web", node, 1);
                i.token = *token;
                i.state = *state;
            }
            // n1 holds a third web instance of the app in the crowded case only
            // (with a newer token, so that it is not the one to go).
            if *name == "crowded node" {
                c.apps = vec![app("shop", 1, 2, 0)];
                c.add("crowd", "web", "n1", 1).token = 6;
            }
            let n3 = c.reg.get_mut("n3").unwrap();
            n3.alive_since = c.now - Duration::from_secs(1);
            let fx = c.tick();
            let gone: Vec<&str> = drains(&fx).into_iter().chain(stops(&fx)).collect();
            assert_eq!(gone, [*want], "{name}");
        }
    }

    #[test]
    fn crashed_instances_count_and_are_not_replaced() {
        let mut c = Cluster::new(vec![app("shop", 1, 2, 0)]);
        c.add("w1", "web", "n1", 1).state = InstanceState::Crashed;
        c.add("w2", "web", "n2", 1);
        let fx = c.tick();
        assert_eq!(fx.len(), 1, "{fx:?}");
        assert_eq!(table(&fx).apps[0].backends.len(), 1);
    }
}
