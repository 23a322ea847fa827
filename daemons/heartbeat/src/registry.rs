//! The registry's state and rules, free of sockets and clocks so every rule has a
//! table test.
//!
//! Liveness is judged on a monotonic clock ([`Now::mono`]): a service's age is the
//! monotonic time since its last beat arrived, so stepping the wall clock (NTP, an
//! operator's `date -s`, a VM resumed) neither marks every service suspect or dead
//! nor keeps a dead one alive. The wall clock is only reported: `last_seen` is the
//! epoch milliseconds at which the last beat arrived, for `registry.list`.
//!
//! Every threshold is `interval × count` with saturating arithmetic, and the
//! interval comes from the peer, so it is bounded first: a beat whose `interval_ms`
//! is outside [`paddock_config::BEAT_INTERVAL_MS`] (10 ms to 1 h) is refused, never
//! clamped (a clamped interval would make a slow sender flap between alive and
//! suspect; a refused one is reported once and never listed).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use paddock_config::BEAT_INTERVAL_MS;
use paddock_wire::kinds::{Beat, Service, ServiceState};

/// The moment an event happens, on both clocks.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    /// Epoch milliseconds, only ever reported (`last_seen`).
    pub wall_ms: i64,
    /// What ages are measured on.
    pub mono: Instant,
}

impl Now {
    pub fn read() -> Now {
        Now {
            wall_ms: paddock_wire::now_ms(),
            mono: Instant::now(),
        }
    }
}

/// Thresholds, in multiples of each sender's own interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    pub suspect_after: u32,
    pub dead_after: u32,
    /// How long a dead entry stays listed after its last beat.
    pub forget_after: Duration,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            suspect_after: 2,
            dead_after: 3,
            forget_after: Duration::from_secs(60),
        }
    }
}

/// A registry event to publish.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Up(Service),
    Down(Service),
}

/// Why a beat was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadBeat {
    #[error("a beat must name its daemon, node and incarnation")]
    EmptyName,
    #[error(
        "interval_ms {0} is outside {lo}-{hi} (10 ms to 1 hour)",
        lo = BEAT_INTERVAL_MS.start(),
        hi = BEAT_INTERVAL_MS.end()
    )]
    Interval(u64),
}

/// One listed service and when (monotonically) its last beat arrived.
#[derive(Debug)]
struct Entry {
    service: Service,
    seen: Instant,
}

impl Entry {
    fn interval(&self) -> Duration {
        Duration::from_millis(self.service.interval_ms)
    }
}

/// The registry: every incarnation heard from, by incarnation id.
#[derive(Debug, Default)]
pub struct Registry {
    entries: HashMap<String, Entry>,
    pub thresholds: Thresholds,
}

impl Registry {
    pub fn new(thresholds: Thresholds) -> Registry {
        Registry {
            entries: HashMap::new(),
            thresholds,
        }
    }

    fn state_for(&self, e: &Entry, now: Now) -> ServiceState {
        let age = now.mono.saturating_duration_since(e.seen);
        let iv = e.interval();
        if age > iv.saturating_mul(self.thresholds.dead_after) {
            ServiceState::Dead
        } else if age > iv.saturating_mul(self.thresholds.suspect_after) {
            ServiceState::Suspect
        } else {
            ServiceState::Alive
        }
    }

    /// Records a beat; returns the changes it caused, or why it was refused (a
    /// refused beat changes nothing).
    pub fn observe(&mut self, beat: Beat, now: Now) -> Result<Vec<Change>, BadBeat> {
        if beat.daemon.is_empty() || beat.node.is_empty() || beat.incarnation.is_empty() {
            return Err(BadBeat::EmptyName);
        }
        if !BEAT_INTERVAL_MS.contains(&beat.interval_ms) {
            return Err(BadBeat::Interval(beat.interval_ms));
        }
        let mut changes = Vec::new();
        // One daemon of a kind per node: a new incarnation means the old one is gone.
        for e in self.entries.values_mut() {
            let s = &mut e.service;
            if s.daemon == beat.daemon
                && s.node == beat.node
                && s.incarnation != beat.incarnation
                && s.state != ServiceState::Dead
            {
                s.state = ServiceState::Dead;
                changes.push(Change::Down(s.clone()));
            }
        }
        let entry = self
            .entries
            .entry(beat.incarnation.clone())
            .or_insert_with(|| Entry {
                service: Service {
                    daemon: beat.daemon.clone(),
                    node: beat.node.clone(),
                    incarnation: beat.incarnation.clone(),
                    endpoints: beat.endpoints.clone(),
                    state: ServiceState::Dead,
                    last_seen: now.wall_ms,
                    interval_ms: beat.interval_ms,
                },
                seen: now.mono,
            });
        entry.seen = now.mono;
        let s = &mut entry.service;
        s.endpoints = beat.endpoints;
        s.interval_ms = beat.interval_ms;
        s.last_seen = now.wall_ms;
        if s.state != ServiceState::Alive {
            s.state = ServiceState::Alive;
            changes.push(Change::Up(s.clone()));
        }
        Ok(changes)
    }

    /// Re-evaluates every entry at `now`; returns the changes.
    pub fn sweep(&mut self, now: Now) -> Vec<Change> {
        let mut changes = Vec::new();
        let states: Vec<(String, ServiceState)> = self
            .entries
            .iter()
            .map(|(k, e)| (k.clone(), self.state_for(e, now)))
            .collect();
        for (k, st) in states {
            let Some(e) = self.entries.get_mut(&k) else {
                continue;
            };
            let s = &mut e.service;
            // Only ever worsen here: a beat is what makes a service alive again.
            let worse = matches!(
                (s.state, st),
                (
                    ServiceState::Alive,
                    ServiceState::Suspect | ServiceState::Dead
                ) | (ServiceState::Suspect, ServiceState::Dead)
            );
            if worse {
                s.state = st;
                changes.push(Change::Down(s.clone()));
            }
        }
        let forget = self.thresholds.forget_after;
        self.entries.retain(|_, e| {
            !(e.service.state == ServiceState::Dead
                && now.mono.saturating_duration_since(e.seen) > forget)
        });
        changes
    }

    /// Every entry, sorted by daemon, node, then last_seen.
    pub fn list(&self) -> Vec<Service> {
        let mut v: Vec<Service> = self.entries.values().map(|e| e.service.clone()).collect();
        v.sort_by(|a, b| {
            (&a.daemon, &a.node, a.last_seen, &a.incarnation).cmp(&(
                &b.daemon,
                &b.node,
                b.last_seen,
                &b.incarnation,
            ))
        });
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beat(daemon: &str, node: &str, incarnation: &str) -> Beat {
        Beat {
            daemon: daemon.into(),
            node: node.into(),
            incarnation: incarnation.into(),
            endpoints: [("rpc".to_string(), "tcp://127.0.0.1:1".to_string())].into(),
            interval_ms: 100,
        }
    }

    /// A clock pair for tests: `at(ms)` is `ms` after the start on both clocks,
    /// `stepped(ms, wall)` is `ms` monotonic milliseconds after the start with the
    /// wall clock reading `wall`.
    struct Clock(Instant);

    impl Clock {
        fn new() -> Clock {
            Clock(Instant::now())
        }
        fn at(&self, ms: u64) -> Now {
            self.stepped(ms, ms as i64)
        }
        fn stepped(&self, ms: u64, wall_ms: i64) -> Now {
            Now {
                wall_ms,
                mono: self.0 + Duration::from_millis(ms),
            }
        }
    }

    fn states(r: &Registry) -> Vec<(String, ServiceState)> {
        r.list()
            .into_iter()
            .map(|s| (s.incarnation, s.state))
            .collect()
    }

    #[test]
    fn alive_suspect_dead_and_back() {
        let c = Clock::new();
        let mut r = Registry::new(Thresholds::default());
        let ch = r.observe(beat("locker", "a", "i1"), c.at(1000)).unwrap();
        assert!(matches!(&ch[..], [Change::Up(s)] if s.state == ServiceState::Alive));
        assert!(
            r.sweep(c.at(1150)).is_empty(),
            "1.5 intervals is still alive"
        );
        let ch = r.sweep(c.at(1201));
        assert!(matches!(&ch[..], [Change::Down(s)] if s.state == ServiceState::Suspect));
        let ch = r.sweep(c.at(1301));
        assert!(matches!(&ch[..], [Change::Down(s)] if s.state == ServiceState::Dead));
        assert!(r.sweep(c.at(1400)).is_empty(), "no repeated events");
        let ch = r.observe(beat("locker", "a", "i1"), c.at(1500)).unwrap();
        assert!(matches!(&ch[..], [Change::Up(_)]));
        assert_eq!(r.list()[0].state, ServiceState::Alive);
        assert_eq!(r.list()[0].last_seen, 1500);
    }

    #[test]
    fn a_new_incarnation_retires_the_old_one_and_dead_entries_are_forgotten() {
        let c = Clock::new();
        let mut r = Registry::new(Thresholds {
            forget_after: Duration::from_millis(1000),
            ..Thresholds::default()
        });
        r.observe(beat("locker", "a", "i1"), c.at(0)).unwrap();
        let ch = r.observe(beat("locker", "a", "i2"), c.at(10)).unwrap();
        assert_eq!(ch.len(), 2);
        assert!(
            matches!(&ch[0], Change::Down(s) if s.incarnation == "i1" && s.state == ServiceState::Dead)
        );
        assert!(matches!(&ch[1], Change::Up(s) if s.incarnation == "i2"));
        r.observe(beat("locker", "a", "i2"), c.at(1500)).unwrap();
        r.sweep(c.at(1500));
        let list = r.list();
        assert_eq!(list.len(), 1, "{list:?}");
        assert_eq!(list[0].incarnation, "i2");
    }

    #[test]
    fn thresholds_follow_each_senders_interval() {
        let c = Clock::new();
        let mut r = Registry::new(Thresholds::default());
        let mut slow = beat("api", "b", "s");
        slow.interval_ms = 1000;
        r.observe(slow, c.at(0)).unwrap();
        r.observe(beat("locker", "a", "f"), c.at(0)).unwrap();
        let ch = r.sweep(c.at(500));
        assert_eq!(ch.len(), 1);
        assert!(matches!(&ch[0], Change::Down(s) if s.incarnation == "f"));
    }

    /// The wall clock jumps (NTP, `date -s`, a resumed VM) while beats keep coming
    /// on time: liveness follows the monotonic clock only, `last_seen` the wall.
    #[test]
    fn a_wall_clock_step_changes_no_state() {
        const HOUR: i64 = 3_600_000;
        // (name, wall clock at the second look, monotonic ms at the second look,
        //  state then)
        let table: &[(&str, i64, u64, ServiceState)] = &[
            (
                "forward an hour, on time",
                1000 + HOUR,
                1050,
                ServiceState::Alive,
            ),
            (
                "back an hour, on time",
                1000 - HOUR,
                1050,
                ServiceState::Alive,
            ),
            (
                "back an hour, beats stopped",
                1000 - HOUR,
                1301,
                ServiceState::Dead,
            ),
            (
                "back past the epoch, beats stopped",
                -HOUR,
                1201,
                ServiceState::Suspect,
            ),
            (
                "forward to the end of time, on time",
                i64::MAX,
                1100,
                ServiceState::Alive,
            ),
        ];
        for &(name, wall, mono, want) in table {
            let c = Clock::new();
            let mut r = Registry::new(Thresholds::default());
            r.observe(beat("locker", "a", "i"), c.at(1000)).unwrap();
            r.sweep(c.stepped(mono, wall));
            assert_eq!(r.list()[0].state, want, "{name}");
            // A dead entry is forgotten by monotonic age too, not by a wall jump.
            r.sweep(c.stepped(mono + 1, i64::MAX));
            assert_eq!(r.list().len(), 1, "{name}: forgotten on a wall clock jump");
        }

        // A beat during the step reports the stepped wall clock and stays alive.
        let c = Clock::new();
        let mut r = Registry::new(Thresholds::default());
        r.observe(beat("locker", "a", "i"), c.at(1000)).unwrap();
        r.observe(beat("locker", "a", "i"), c.stepped(1100, 1100 - HOUR))
            .unwrap();
        assert!(r.sweep(c.stepped(1150, 1150 + HOUR)).is_empty());
        assert_eq!(r.list()[0].last_seen, 1100 - HOUR);
    }

    #[test]
    fn intervals_outside_the_cluster_rule_are_refused() {
        let table: &[(u64, Result<(), BadBeat>)] = &[
            (0, Err(BadBeat::Interval(0))),
            (9, Err(BadBeat::Interval(9))),
            (10, Ok(())),
            (3_600_000, Ok(())),
            (3_600_001, Err(BadBeat::Interval(3_600_001))),
            (u64::MAX / 2, Err(BadBeat::Interval(u64::MAX / 2))),
            (u64::MAX, Err(BadBeat::Interval(u64::MAX))),
        ];
        for (iv, want) in table {
            let c = Clock::new();
            let mut r = Registry::new(Thresholds::default());
            let mut b = beat("locker", "a", "i");
            b.interval_ms = *iv;
            let got = r.observe(b, c.at(0)).map(|_| ());
            assert_eq!(&got, want, "interval {iv}");
            assert_eq!(r.list().len(), usize::from(want.is_ok()), "interval {iv}");
            // Sweeping far ahead never overflows.
            r.sweep(c.at(u64::MAX / 4));
        }
    }

    #[test]
    fn a_refused_beat_leaves_an_existing_entry_alone() {
        let c = Clock::new();
        let mut r = Registry::new(Thresholds::default());
        r.observe(beat("locker", "a", "i"), c.at(0)).unwrap();
        let mut b = beat("locker", "a", "i");
        b.interval_ms = u64::MAX;
        assert_eq!(r.observe(b, c.at(50)), Err(BadBeat::Interval(u64::MAX)));
        let mut b = beat("locker", "a", "other");
        b.interval_ms = 0;
        assert!(
            r.observe(b, c.at(50)).is_err(),
            "no retirement by a bad beat"
        );
        assert_eq!(states(&r), vec![("i".into(), ServiceState::Alive)]);
        assert_eq!(r.list()[0].interval_ms, 100);
        // Its age still counts from the last good beat.
        r.sweep(c.at(301));
        assert_eq!(states(&r), vec![("i".into(), ServiceState::Dead)]);
    }

    #[test]
    fn empty_names_are_refused() {
        let c = Clock::new();
        let mut r = Registry::new(Thresholds::default());
        for b in [beat("", "a", "i"), beat("x", "", "i"), beat("x", "a", "")] {
            assert_eq!(r.observe(b, c.at(0)), Err(BadBeat::EmptyName));
        }
        assert!(r.list().is_empty());
    }

    /// The largest interval times the largest counts is judged exactly, without
    /// overflow, right at the thresholds.
    #[test]
    fn the_largest_interval_and_counts_are_judged_exactly() {
        let c = Clock::new();
        let mut r = Registry::new(Thresholds {
            suspect_after: u32::MAX - 1,
            dead_after: u32::MAX,
            forget_after: Duration::MAX,
        });
        let iv = *BEAT_INTERVAL_MS.end();
        let mut b = beat("locker", "a", "i");
        b.interval_ms = iv;
        r.observe(b, c.at(0)).unwrap();
        let suspect_at = iv * u64::from(u32::MAX - 1);
        assert!(r.sweep(c.at(suspect_at)).is_empty());
        r.sweep(c.at(suspect_at + 1));
        assert_eq!(states(&r), vec![("i".into(), ServiceState::Suspect)]);
        r.sweep(c.at(suspect_at + iv));
        assert_eq!(states(&r), vec![("i".into(), ServiceState::Suspect)]);
        r.sweep(c.at(suspect_at + iv + 1));
        assert_eq!(states(&r), vec![("i".into(), ServiceState::Dead)]);
        r.sweep(c.at(u64::MAX / 4));
        assert_eq!(
            r.list().len(),
            1,
            "forget_after = Duration::MAX never forgets"
        );
    }
}
