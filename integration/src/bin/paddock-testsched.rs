//! A stand-in scheduler for the balancer's tests (never installed): a BaseDaemon
//! named `scheduler` that serves the route table in the file
//! `$PADDOCK_TESTSCHED_TABLE` (`{"token": N, "apps": [...]}`): it answers
//! `routes.snapshot` with it, and publishes it as `routes.table` whenever the file
//! changes — unless `PADDOCK_TESTSCHED_SILENT` is set, when only the snapshot
//! tells (a missed event, to heal by resync).

use std::time::Duration;

use paddock_daemon::{Ctx, Routes, Spec};
use paddock_wire::{kinds, WireError};
use serde_json::Value;

fn read_table() -> Result<Value, WireError> {
    let p = std::env::var("PADDOCK_TESTSCHED_TABLE")
        .map_err(|_| WireError::internal("PADDOCK_TESTSCHED_TABLE is not set"))?;
    let text =
        std::fs::read_to_string(&p).map_err(|e| WireError::unavailable(format!("{p}: {e}")))?;
    serde_json::from_str(&text).map_err(|e| WireError::internal(format!("{p}: {e}")))
}

async fn setup(ctx: Ctx) -> anyhow::Result<Routes> {
    if std::env::var_os("PADDOCK_TESTSCHED_SILENT").is_none() {
        let c = ctx.clone();
        actix_rt::spawn(async move {
            let mut last: Option<Value> = None;
            loop {
                if let Ok(t) = read_table() {
                    if last.as_ref() != Some(&t) {
                        c.server().publish(kinds::ROUTES_TABLE, t.clone());
                        last = Some(t);
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
    }
    Ok(Routes::new().on(kinds::ROUTES_SNAPSHOT, |_env| async move { read_table() }))
}

fn main() {
    paddock_daemon::main(
        Spec {
            name: "scheduler",
            version: env!("CARGO_PKG_VERSION"),
            pull: false,
            publish: true,
            check: paddock_daemon::no_check,
            push_to: paddock_daemon::no_push_to,
            user_keys: None,
        },
        setup,
    )
}
