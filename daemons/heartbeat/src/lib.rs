//! paddock-heartbeat: the service registry with liveness.
//!
//! Every daemon PUSHes `heartbeat.beat` to every heartbeat; each heartbeat keeps its
//! own view (an actix actor), marks a service `suspect` after `suspect_after` missed
//! intervals and `dead` after `dead_after` (of the sender's own interval), answers
//! `registry.list`, and PUBlishes `registry.up` / `registry.down` on transitions.
//! Nothing is stored: after a restart the view is rebuilt from the beats that arrive.
//!
//! Architecture invariant: the registry is rebuilt only from beats; it never asks the
//! database or other heartbeats, so two heartbeats fed the same beats agree.

use std::collections::HashMap;
use std::time::Duration;

use actix::prelude::*;
use paddock_config::{ClusterConfig, ConfigError};
use paddock_daemon::{Ctx, Routes, Spec};
use paddock_wire::kinds::{self, Beat, Service, ServiceList, ServiceState};
use paddock_wire::{now_ms, ServerHandle, WireError};

pub fn spec() -> Spec {
    Spec {
        name: "heartbeat",
        version: env!("CARGO_PKG_VERSION"),
        pull: true,
        publish: true,
        check: |cfg| thresholds(cfg).map(|_| ()),
        push_to: paddock_daemon::no_push_to,
    }
}

/// Thresholds, in multiples of each sender's own interval.
#[derive(Debug, Clone, Copy)]
pub struct Thresholds {
    pub suspect_after: u64,
    pub dead_after: u64,
    /// How long a dead entry stays listed before it is dropped, in ms.
    pub forget_after_ms: i64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            suspect_after: 2,
            dead_after: 3,
            forget_after_ms: 60_000,
        }
    }
}

/// A registry event to publish.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Up(Service),
    Down(Service),
}

/// The registry's state and rules, free of sockets so it can be unit tested.
#[derive(Debug, Default)]
pub struct Registry {
    services: HashMap<String, Service>,
    pub thresholds: Thresholds,
}

impl Registry {
    pub fn new(thresholds: Thresholds) -> Registry {
        Registry {
            services: HashMap::new(),
            thresholds,
        }
    }

    fn state_for(&self, s: &Service, now: i64) -> ServiceState {
        let age = (now - s.last_seen).max(0) as u64;
        let iv = s.interval_ms.max(1);
        if age > self.thresholds.dead_after * iv {
            ServiceState::Dead
        } else if age > self.thresholds.suspect_after * iv {
            ServiceState::Suspect
        } else {
            ServiceState::Alive
        }
    }

    /// Records a beat; returns the changes it caused.
    pub fn observe(&mut self, beat: Beat, now: i64) -> Vec<Change> {
        let mut changes = Vec::new();
        // One daemon of a kind per node: a new incarnation means the old one is gone.
        for s in self.services.values_mut() {
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
            .services
            .entry(beat.incarnation.clone())
            .or_insert_with(|| Service {
                daemon: beat.daemon.clone(),
                node: beat.node.clone(),
                incarnation: beat.incarnation.clone(),
                endpoints: beat.endpoints.clone(),
                state: ServiceState::Dead,
                last_seen: now,
                interval_ms: beat.interval_ms,
            });
        entry.endpoints = beat.endpoints;
        entry.interval_ms = beat.interval_ms;
        entry.last_seen = now;
        if entry.state != ServiceState::Alive {
            entry.state = ServiceState::Alive;
            changes.push(Change::Up(entry.clone()));
        }
        changes
    }

    /// Re-evaluates every entry at `now`; returns the changes.
    pub fn sweep(&mut self, now: i64) -> Vec<Change> {
        let mut changes = Vec::new();
        let forget = self.thresholds.forget_after_ms;
        let states: Vec<(String, ServiceState)> = self
            .services
            .iter()
            .map(|(k, s)| (k.clone(), self.state_for(s, now)))
            .collect();
        for (k, st) in states {
            let Some(s) = self.services.get_mut(&k) else {
                continue;
            };
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
        self.services
            .retain(|_, s| !(s.state == ServiceState::Dead && now - s.last_seen > forget));
        changes
    }

    /// Every entry, sorted by daemon, node, then last_seen.
    pub fn list(&self) -> Vec<Service> {
        let mut v: Vec<Service> = self.services.values().cloned().collect();
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

/// The registry as an actor: beats and list queries are its messages, and it sweeps
/// itself on a timer, publishing every change.
pub struct RegistryActor {
    registry: Registry,
    server: ServerHandle,
}

impl RegistryActor {
    fn publish(&self, changes: Vec<Change>) {
        for c in changes {
            match c {
                Change::Up(s) => {
                    tracing::info!(daemon = %s.daemon, node = %s.node, incarnation = %s.incarnation, "up");
                    self.server.publish(kinds::REGISTRY_UP, kinds::to_body(&s));
                }
                Change::Down(s) => {
                    tracing::info!(daemon = %s.daemon, node = %s.node, incarnation = %s.incarnation, state = s.state.as_str(), "down");
                    self.server
                        .publish(kinds::REGISTRY_DOWN, kinds::to_body(&s));
                }
            }
        }
    }
}

impl Actor for RegistryActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(Duration::from_millis(50), |act, _| {
            let changes = act.registry.sweep(now_ms());
            act.publish(changes);
        });
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct Observe(Beat);

#[derive(Message)]
#[rtype(result = "Vec<Service>")]
struct List;

#[derive(Message)]
#[rtype(result = "()")]
struct SetThresholds(Thresholds);

impl Handler<Observe> for RegistryActor {
    type Result = ();
    fn handle(&mut self, msg: Observe, _: &mut Context<Self>) {
        let changes = self.registry.observe(msg.0, now_ms());
        self.publish(changes);
    }
}

impl Handler<List> for RegistryActor {
    type Result = MessageResult<List>;
    fn handle(&mut self, _: List, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.registry.list())
    }
}

impl Handler<SetThresholds> for RegistryActor {
    type Result = ();
    fn handle(&mut self, msg: SetThresholds, _: &mut Context<Self>) {
        self.registry.thresholds = msg.0;
    }
}

fn thresholds(cfg: &ClusterConfig) -> Result<Thresholds, ConfigError> {
    let d = Thresholds::default();
    let t = Thresholds {
        suspect_after: cfg.daemon_u64("heartbeat", "suspect_after", d.suspect_after)?,
        dead_after: cfg.daemon_u64("heartbeat", "dead_after", d.dead_after)?,
        forget_after_ms: cfg.daemon_u64("heartbeat", "forget_after_ms", d.forget_after_ms as u64)?
            as i64,
    };
    if t.suspect_after == 0 || t.dead_after <= t.suspect_after {
        return Err(cfg.invalid(
            "daemons.heartbeat.dead_after",
            format!(
                "must exceed suspect_after, and suspect_after must be at least 1 (got {} and {})",
                t.dead_after, t.suspect_after
            ),
        ));
    }
    Ok(t)
}

/// Registers the registry actor and the heartbeat's kinds.
pub async fn setup(ctx: Ctx) -> anyhow::Result<Routes> {
    let registry = RegistryActor {
        registry: Registry::new(thresholds(&ctx.config())?),
        server: ctx.server().clone(),
    }
    .start();

    // Follow SIGHUP reloads of the thresholds.
    let mut updates = ctx.config_updates();
    let (c2, r2) = (ctx.clone(), registry.clone());
    actix_rt::spawn(async move {
        while updates.changed().await.is_ok() {
            match thresholds(&c2.config()) {
                Ok(t) => r2.do_send(SetThresholds(t)),
                Err(e) => tracing::warn!("keeping the old thresholds: {e}"),
            }
        }
    });

    let on_beat = registry.clone();
    let on_list = registry.clone();
    Ok(Routes::new()
        .on_pull(move |env| {
            if env.kind != kinds::HEARTBEAT_BEAT {
                tracing::warn!(kind = %env.kind, from = %env.from, "ignored a pipeline message that is not a beat");
                return;
            }
            match kinds::parse_body::<Beat>(&env.kind, &env.body) {
                Ok(b) if b.interval_ms >= 10 && !b.daemon.is_empty() && !b.node.is_empty() && !b.incarnation.is_empty() => {
                    on_beat.do_send(Observe(b))
                }
                Ok(_) => tracing::warn!(from = %env.from, "ignored a beat with empty names or an interval under 10 ms"),
                Err(e) => tracing::warn!(from = %env.from, "ignored a beat: {}", e.message),
            }
        })
        .on(kinds::REGISTRY_LIST, move |_env| {
            let r = on_list.clone();
            async move {
                let services = r
                    .send(List)
                    .await
                    .map_err(|e| WireError::internal(format!("registry actor: {e}")))?;
                Ok(kinds::to_body(&ServiceList { services }))
            }
        }))
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

    #[test]
    fn alive_suspect_dead_and_back() {
        let mut r = Registry::new(Thresholds::default());
        let ch = r.observe(beat("locker", "a", "i1"), 1000);
        assert!(matches!(&ch[..], [Change::Up(s)] if s.state == ServiceState::Alive));
        assert!(r.sweep(1150).is_empty(), "1.5 intervals is still alive");
        let ch = r.sweep(1201);
        assert!(matches!(&ch[..], [Change::Down(s)] if s.state == ServiceState::Suspect));
        let ch = r.sweep(1301);
        assert!(matches!(&ch[..], [Change::Down(s)] if s.state == ServiceState::Dead));
        assert!(r.sweep(1400).is_empty(), "no repeated events");
        let ch = r.observe(beat("locker", "a", "i1"), 1500);
        assert!(matches!(&ch[..], [Change::Up(_)]));
        assert_eq!(r.list()[0].state, ServiceState::Alive);
    }

    #[test]
    fn a_new_incarnation_retires_the_old_one_and_dead_entries_are_forgotten() {
        let mut r = Registry::new(Thresholds {
            forget_after_ms: 1000,
            ..Thresholds::default()
        });
        r.observe(beat("locker", "a", "i1"), 0);
        let ch = r.observe(beat("locker", "a", "i2"), 10);
        assert_eq!(ch.len(), 2);
        assert!(
            matches!(&ch[0], Change::Down(s) if s.incarnation == "i1" && s.state == ServiceState::Dead)
        );
        assert!(matches!(&ch[1], Change::Up(s) if s.incarnation == "i2"));
        r.observe(beat("locker", "a", "i2"), 1500);
        r.sweep(1500);
        let list = r.list();
        assert_eq!(list.len(), 1, "{list:?}");
        assert_eq!(list[0].incarnation, "i2");
    }

    #[test]
    fn thresholds_follow_each_senders_interval() {
        let mut r = Registry::new(Thresholds::default());
        let mut slow = beat("api", "b", "s");
        slow.interval_ms = 1000;
        r.observe(slow, 0);
        r.observe(beat("locker", "a", "f"), 0);
        let ch = r.sweep(500);
        assert_eq!(ch.len(), 1);
        assert!(matches!(&ch[0], Change::Down(s) if s.incarnation == "f"));
    }
}
