//! Where new instances go. [`Room`] is the runners' free memory and spread,
//! computed from the registry and the instances; `place` picks, for one
//! instance, the settled alive node that has the memory and the fewest
//! instances of that app's process type (then the fewest instances, then the
//! most free memory, then the name, so the choice is deterministic), and
//! reserves the memory there.

use std::collections::BTreeMap;
use std::time::Instant;

use crate::model::{Formation, Instance, Liveness, NodeId, Policy, Registry, Shortfall};

#[derive(Debug, Clone, PartialEq)]
struct Slot {
    /// Alive and settled: may take new work.
    eligible: bool,
    free_mb: u64,
    /// (app, proc) → instances there.
    spread: BTreeMap<(String, String), u32>,
    total: u32,
}

/// The nodes' room for new work.
#[derive(Debug, Clone, PartialEq)]
pub struct Room {
    slots: BTreeMap<NodeId, Slot>,
}

impl Room {
    /// Every instance not stopping or stopped takes its memory on its node,
    /// whoever owns it; a node is eligible when alive for `node_settle` or more.
    pub fn new(registry: &Registry, instances: &[Instance], now: Instant, p: &Policy) -> Room {
        let mut slots: BTreeMap<NodeId, Slot> = registry
            .values()
            .map(|n| {
                let settled = now.saturating_duration_since(n.alive_since) >= p.node_settle;
                let slot = Slot {
                    eligible: n.liveness == Liveness::Alive && settled,
                    free_mb: n.offer_memory_mb,
                    spread: BTreeMap::new(),
                    total: 0,
                };
                (n.id.clone(), slot)
            })
            .collect();
        for i in instances.iter().filter(|i| !i.state.is_gone()) {
            if let Some(s) = slots.get_mut(&i.node) {
                s.take(&i.app, &i.proc, i.memory_mb);
            }
        }
        Room { slots }
    }

    /// The node for one more instance of `app`'s `proc`, its memory reserved;
    /// None when no eligible node has the memory.
    pub fn place(&mut self, app: &str, proc: &str, memory_mb: u64) -> Option<NodeId> {
        let key = (app.to_string(), proc.to_string());
        let (node, slot) = self
            .slots
            .iter_mut()
            .filter(|(_, s)| s.eligible && s.free_mb >= memory_mb)
            .min_by_key(|(id, s)| {
                let same = s.spread.get(&key).copied().unwrap_or(0);
                (same, s.total, std::cmp::Reverse(s.free_mb), (*id).clone())
            })?;
        slot.take(app, proc, memory_mb);
        Some(node.clone())
    }

    /// Places `wanted` instances, as many as fit; the nodes chosen, in order.
    pub fn place_n(&mut self, app: &str, proc: &str, memory_mb: u64, wanted: u32) -> Vec<NodeId> {
        (0..wanted)
            .map_while(|_| self.place(app, proc, memory_mb))
            .collect()
    }

    /// Whether the node may take new work now.
    pub fn eligible(&self, node: &str) -> bool {
        self.slots.get(node).is_some_and(|s| s.eligible)
    }

    pub fn free_mb(&self, node: &str) -> Option<u64> {
        self.slots.get(node).map(|s| s.free_mb)
    }
}

impl Slot {
    fn take(&mut self, app: &str, proc: &str, memory_mb: u64) {
        self.free_mb = self.free_mb.saturating_sub(memory_mb);
        *self
            .spread
            .entry((app.to_string(), proc.to_string()))
            .or_insert(0) += 1;
        self.total += 1;
    }
}

/// Whether `formation` fits, given `running` (proc → instances already counted
/// in `room`): the first process type that cannot be fully placed, as "N of M
/// placed", so the caller reverts the formation change and fails fast.
pub fn check_formation(
    room: &Room,
    app: &str,
    formation: &Formation,
    running: &BTreeMap<String, u32>,
) -> Result<(), Shortfall> {
    let mut room = room.clone();
    for (proc, scale) in formation {
        let have = running.get(proc).copied().unwrap_or(0);
        let missing = scale.quantity.saturating_sub(have);
        let placed = room.place_n(app, proc, scale.memory_mb, missing).len() as u32;
        if placed < missing {
            return Err(Shortfall {
                app: app.to_string(),
                proc: proc.clone(),
                placed: have.min(scale.quantity) + placed,
                wanted: scale.quantity,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::Duration;

    use super::*;
    use crate::model::{InstanceState, Node, Owner, Scale};

    pub(crate) fn policy() -> Policy {
        Policy {
            min_healthy: Duration::from_secs(10),
            healthy_deadline: Duration::from_secs(30),
            progress_deadline: Duration::from_secs(300),
            watch_window: Duration::from_secs(60),
            crash_restarts: 3,
            drain_period: Duration::from_secs(5),
            node_settle: Duration::from_secs(30),
        }
    }

    /// Nodes alive for an hour at `t0 + 1h`, each offering `mb`.
    pub(crate) fn nodes(t0: Instant, names: &[&str], mb: u64) -> Registry {
        names
            .iter()
            .map(|n| {
                let node = Node {
                    id: n.to_string(),
                    liveness: Liveness::Alive,
                    alive_since: t0,
                    offer_memory_mb: mb,
                };
                (n.to_string(), node)
            })
            .collect()
    }

    pub(crate) fn inst(id: &str, app: &str, proc: &str, node: &str, mb: u64) -> Instance {
        Instance {
            id: id.into(),
            app: app.into(),
            proc: proc.into(),
            version: 1,
            node: node.into(),
            addr: Some(format!("{node}:{}", 5000 + id.len())),
            state: InstanceState::Up,
            up_at: None,
            memory_mb: mb,
            token: 1,
            owner: Owner::Scheduler,
            restarts: 0,
        }
    }

    fn hour() -> Duration {
        Duration::from_secs(3600)
    }

    /// Table: (nodes, offer each, existing (node, mb), wanted, memory) → counts per node.
    #[test]
    fn spread_and_memory_table() {
        type Case = (
            &'static [&'static str],
            u64,
            &'static [(&'static str, u64)],
            u32,
            u64,
            &'static [u32],
        );
        let cases: &[Case] = &[
            // web=3 on 3 runners: one each.
            (&["a", "b", "c"], 1024, &[], 3, 256, &[1, 1, 1]),
            // web=4 on 3 runners: 2/1/1.
            (&["a", "b", "c"], 1024, &[], 4, 256, &[2, 1, 1]),
            // A node full of other work takes none.
            (&["a", "b", "c"], 1024, &[("a", 1024)], 3, 256, &[0, 2, 1]),
            // Memory left over after others' instances: b fits one 512, c two.
            (
                &["a", "b", "c"],
                1024,
                &[("a", 1024), ("b", 600)],
                3,
                400,
                &[0, 1, 2],
            ),
            // Nothing fits at all.
            (&["a"], 256, &[], 2, 512, &[0]),
        ];
        for (i, (names, mb, existing, wanted, size, want)) in cases.iter().enumerate() {
            let t0 = Instant::now();
            let reg = nodes(t0, names, *mb);
            let others: Vec<Instance> = existing
                .iter()
                .enumerate()
                .map(|(k, (n, m))| inst(&format!("o{k}"), "other", "web", n, *m))
                .collect();
            let mut room = Room::new(&reg, &others, t0 + hour(), &policy());
            let got = room.place_n("shop", "web", *size, *wanted);
            let counts: Vec<u32> = names
                .iter()
                .map(|n| got.iter().filter(|g| g == n).count() as u32)
                .collect();
            assert_eq!(&counts, want, "case {i}");
        }
    }

    #[test]
    fn spread_counts_existing_instances_of_the_same_process_type() {
        let t0 = Instant::now();
        let reg = nodes(t0, &["a", "b", "c"], 4096);
        let have = vec![
            inst("1", "shop", "web", "a", 256),
            inst("2", "shop", "web", "a", 256),
            inst("3", "shop", "worker", "b", 256),
        ];
        let mut room = Room::new(&reg, &have, t0 + hour(), &policy());
        // c has nothing; b has no web (a worker only), so it comes before a;
        // then c again, having fewer instances in all than b.
        assert_eq!(room.place("shop", "web", 256).as_deref(), Some("c"));
        assert_eq!(room.place("shop", "web", 256).as_deref(), Some("b"));
        assert_eq!(room.place("shop", "web", 256).as_deref(), Some("c"));
        assert_eq!(room.place("shop", "web", 256).as_deref(), Some("b"));
        assert_eq!(room.place("shop", "web", 256).as_deref(), Some("a"));
    }

    #[test]
    fn stopped_instances_take_no_memory() {
        let t0 = Instant::now();
        let reg = nodes(t0, &["a"], 512);
        let mut gone = inst("1", "shop", "web", "a", 512);
        gone.state = InstanceState::Stopped;
        let mut room = Room::new(&reg, &[gone], t0 + hour(), &policy());
        assert_eq!(room.place("shop", "web", 512).as_deref(), Some("a"));
        assert_eq!(room.free_mb("a"), Some(0));
    }

    /// Table: (liveness, alive for) → eligible.
    #[test]
    fn only_settled_alive_nodes_take_work() {
        let p = policy();
        let cases = [
            (Liveness::Alive, hour(), true),
            (Liveness::Alive, p.node_settle, true),
            (
                Liveness::Alive,
                p.node_settle - Duration::from_millis(1),
                false,
            ),
            (Liveness::Suspect, hour(), false),
            (Liveness::Dead, hour(), false),
        ];
        for (i, (liveness, age, want)) in cases.into_iter().enumerate() {
            let t0 = Instant::now();
            let mut reg = nodes(t0, &["a"], 1024);
            reg.get_mut("a").unwrap().liveness = liveness;
            let mut room = Room::new(&reg, &[], t0 + age, &p);
            assert_eq!(room.eligible("a"), want, "case {i}");
            assert_eq!(room.place("s", "web", 1).is_some(), want, "case {i}");
        }
    }

    #[test]
    fn an_unplaceable_formation_says_n_of_m() {
        let t0 = Instant::now();
        let reg = nodes(t0, &["a", "b"], 1024);
        let have = vec![inst("1", "shop", "web", "a", 512)];
        let room = Room::new(&reg, &have, t0 + hour(), &policy());
        let running = BTreeMap::from([("web".to_string(), 1)]);
        let fits = Formation::from([(
            "web".to_string(),
            Scale {
                quantity: 3,
                memory_mb: 512,
            },
        )]);
        assert_eq!(check_formation(&room, "shop", &fits, &running), Ok(()));
        let too_big = Formation::from([(
            "web".to_string(),
            Scale {
                quantity: 5,
                memory_mb: 512,
            },
        )]);
        let err = check_formation(&room, "shop", &too_big, &running).unwrap_err();
        assert_eq!((err.placed, err.wanted), (4, 5));
        // The check reserved nothing in the caller's room.
        assert_eq!(room.free_mb("b"), Some(1024));
    }
}
