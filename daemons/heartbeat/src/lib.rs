//! paddock-heartbeat: the service registry with liveness.
//!
//! Every daemon PUSHes `heartbeat.beat` to every heartbeat; each heartbeat keeps its
//! own view (an actix actor), marks a service `suspect` after `suspect_after` missed
//! intervals and `dead` after `dead_after` (of the sender's own interval), answers
//! `registry.list`, and PUBlishes `registry.up` / `registry.down` on transitions.
//! Nothing is stored: after a restart the view is rebuilt from the beats that arrive.
//! Ages are measured on the monotonic clock (see `registry`), and a beat whose
//! interval is outside the cluster's rule is refused before any arithmetic.
//!
//! Architecture invariant: the registry is rebuilt only from beats; it never asks the
//! database or other heartbeats, so two heartbeats fed the same beats agree.

use std::time::{Duration, Instant};

use actix::prelude::*;
use paddock_daemon::{Ctx, Routes, Spec};
use paddock_wire::kinds::{self, Beat, Service, ServiceList};
use paddock_wire::{ServerHandle, WireError};

pub mod registry;
pub mod settings;

pub use registry::{BadBeat, Change, Now, Registry, Thresholds};
pub use settings::{thresholds, HeartbeatSection};

pub fn spec() -> Spec {
    Spec {
        name: settings::NAME,
        version: env!("CARGO_PKG_VERSION"),
        pull: true,
        publish: true,
        user_keys: None,
        check: |cfg| thresholds(cfg).map(|_| ()),
        push_to: paddock_daemon::no_push_to,
    }
}

/// The registry as an actor: beats and list queries are its messages, and it sweeps
/// itself on a timer, publishing every change.
pub struct RegistryActor {
    registry: Registry,
    server: ServerHandle,
    refused: RateLimit,
}

/// Refused input is logged at WARN, at most once per period, with how many were
/// refused in between, so a stranger cannot flood the log.
struct RateLimit {
    period: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimit {
    fn new(period: Duration) -> RateLimit {
        RateLimit {
            period,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(n)`: log now, `n` refusals were not logged since the last line.
    fn allow(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(t) if now.saturating_duration_since(t) < self.period => {
                self.suppressed = self.suppressed.saturating_add(1);
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
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
            let changes = act.registry.sweep(Now::read());
            act.publish(changes);
        });
    }
}

/// What arrived on the PULL socket: a beat, or something refused before parsing
/// got far enough to make one (logged by the actor, rate limited).
#[derive(Message)]
#[rtype(result = "()")]
enum Pulled {
    Beat {
        beat: Beat,
        /// The signing key id, for the log.
        from: String,
    },
    Refused {
        from: String,
        why: String,
    },
}

#[derive(Message)]
#[rtype(result = "Vec<Service>")]
struct List;

#[derive(Message)]
#[rtype(result = "()")]
struct SetThresholds(Thresholds);

impl RegistryActor {
    fn refused(&mut self, now: Instant, from: &str, why: &dyn std::fmt::Display) {
        if let Some(more) = self.refused.allow(now) {
            // The reason may quote what the sender wrote (a kind, a field): escaped.
            let why = why.to_string();
            tracing::warn!(from = ?from, also_refused = more, "ignored a beat: {}", why.escape_debug());
        }
    }
}

impl Handler<Pulled> for RegistryActor {
    type Result = ();
    fn handle(&mut self, msg: Pulled, _: &mut Context<Self>) {
        let now = Now::read();
        match msg {
            Pulled::Beat { beat, from } => match self.registry.observe(beat, now) {
                Ok(changes) => self.publish(changes),
                Err(e) => self.refused(now.mono, &from, &e),
            },
            Pulled::Refused { from, why } => self.refused(now.mono, &from, &why),
        }
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

/// Registers the registry actor and the heartbeat's kinds.
pub async fn setup(ctx: Ctx) -> anyhow::Result<Routes> {
    let registry = RegistryActor {
        registry: Registry::new(thresholds(&ctx.config())?),
        server: ctx.server().clone(),
        refused: RateLimit::new(Duration::from_secs(10)),
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
            let from = env.from.clone();
            // The registry itself refuses beats it cannot judge (registry::BadBeat).
            let pulled = if env.kind != kinds::HEARTBEAT_BEAT {
                Pulled::Refused {
                    from,
                    why: format!("`{}` is not a beat", env.kind),
                }
            } else {
                match kinds::parse_body::<Beat>(&env.kind, &env.body) {
                    Ok(beat) => Pulled::Beat { beat, from },
                    Err(e) => Pulled::Refused {
                        from,
                        why: e.message,
                    },
                }
            };
            on_beat.do_send(pulled);
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

    #[test]
    fn refusals_are_logged_once_per_period_with_a_count() {
        let t0 = Instant::now();
        let mut r = RateLimit::new(Duration::from_secs(10));
        assert_eq!(r.allow(t0), Some(0));
        assert_eq!(r.allow(t0 + Duration::from_secs(1)), None);
        assert_eq!(r.allow(t0 + Duration::from_secs(9)), None);
        assert_eq!(r.allow(t0 + Duration::from_secs(10)), Some(2));
        assert_eq!(r.allow(t0 + Duration::from_secs(11)), None);
    }
}
