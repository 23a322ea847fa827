//! A test-only daemon on the BaseDaemon runtime, so integration tests can prove what
//! every daemon inherits: a panicking actor ends the process, a critical loop that
//! ends ends the process, a failing resilient loop is restarted and counted,
//! SIGTERM lets requests in flight finish. Behaviour is chosen by environment
//! variables (see `setup`). It is never installed.

use std::time::Duration;

use actix::prelude::*;
use paddock_daemon::{Ctx, LoopKind, Routes, Spec};
use paddock_wire::WireError;
use serde_json::json;

struct Bomb;

impl Actor for Bomb {
    type Context = Context<Self>;
}

#[derive(Message)]
#[rtype(result = "()")]
struct Explode;

impl Handler<Explode> for Bomb {
    type Result = ();
    fn handle(&mut self, _: Explode, _: &mut Context<Self>) {
        panic!("test.panic asked this actor to panic");
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok()?.parse().ok()
}

async fn setup(ctx: Ctx) -> anyhow::Result<Routes> {
    if let Some(fails) = env_u64("PADDOCK_TESTD_RESILIENT_FAILS") {
        let mut n = 0;
        ctx.spawn_loop("flaky", LoopKind::Resilient, move || {
            n += 1;
            let this = n;
            async move {
                if this <= fails {
                    anyhow::bail!("flaky failure {this} of {fails}");
                }
                std::future::pending().await
            }
        });
    }
    if let Some(ms) = env_u64("PADDOCK_TESTD_CRITICAL_AFTER_MS") {
        ctx.spawn_loop("doomed", LoopKind::Critical, move || async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(())
        });
    }
    let bomb = Bomb.start();
    let server = ctx.server().clone();
    Ok(Routes::new()
        // Stops the ZeroMQ I/O thread as if its sockets had failed: the daemon must
        // then exit rather than linger half-alive.
        .on("test.stop_io", move |_| {
            let server = server.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                server.stop();
                Ok(json!({}))
            }
        })
        .on("test.panic", move |_| {
            let b = bomb.clone();
            async move {
                b.send(Explode)
                    .await
                    .map_err(|e| WireError::internal(e.to_string()))?;
                Ok(json!({}))
            }
        })
        .on("test.sleep", |env| async move {
            let ms = env.body.get("ms").and_then(|v| v.as_u64()).unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(json!({"slept_ms": ms}))
        }))
}

fn main() {
    paddock_daemon::main(
        Spec {
            name: "testd",
            version: env!("CARGO_PKG_VERSION"),
            pull: false,
            publish: false,
            check: paddock_daemon::no_check,
            push_to: paddock_daemon::no_push_to,
            user_keys: None,
        },
        setup,
    )
}
