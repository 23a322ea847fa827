//! paddock-locker: named leases with TTL and fencing tokens, stored in PostgreSQL.
//!
//! Every grant bumps one counter row inside the granting transaction, so tokens
//! strictly increase across locker restarts, across several lockers on one database,
//! and across a failover with synchronous replication. Expiry is judged by the
//! database's clock (`clock_timestamp()`), the one clock every locker shares.
//!
//! Architecture invariant: the locker keeps no lease state in memory; every answer
//! comes from the database, so any number of lockers may serve the same locks.

use std::rc::Rc;

use actix::prelude::*;
use paddock_config::{ClusterConfig, ConfigError};
use paddock_daemon::{body, Ctx, LoopKind, Routes, Spec};
use paddock_db::Db;
use paddock_wire::kinds;
use paddock_wire::{Code, Envelope, WireError};
use serde_json::Value;

pub mod client;
pub mod settings;
mod store;

pub use settings::{settings, LockerSection, Settings};

pub use store::{
    reply_error, Attempt, Stage, Store, StoreError, MAX_TTL_MS, MAX_WAIT_MS, RENEW_SQL,
};

pub fn spec() -> Spec {
    Spec {
        name: settings::NAME,
        version: env!("CARGO_PKG_VERSION"),
        pull: false,
        publish: false,
        user_keys: None,
        check,
        push_to: paddock_daemon::no_push_to,
    }
}

/// The locker's own checks: its section and a database URL that parses.
fn check(cfg: &ClusterConfig) -> Result<(), ConfigError> {
    settings(cfg).map(|_| ())
}

/// The locker's control actor: each lock kind is a message; handlers run their SQL
/// concurrently (`ResponseFuture`), so a waiting `lock.acquire` blocks nobody.
pub struct Locker {
    store: Rc<Store>,
    ready: Rc<std::cell::Cell<bool>>,
}

impl Actor for Locker {
    type Context = Context<Self>;
}

#[derive(Message)]
#[rtype(result = "Result<Value, WireError>")]
pub struct Call(pub Envelope);

impl Handler<Call> for Locker {
    type Result = ResponseFuture<Result<Value, WireError>>;

    fn handle(&mut self, msg: Call, _: &mut Context<Self>) -> Self::Result {
        let store = self.store.clone();
        let ready = self.ready.get();
        Box::pin(async move {
            if !ready {
                return Err(WireError::unavailable(
                    "the locker has not finished migrating its database yet; retry shortly",
                ));
            }
            let env = msg.0;
            match env.kind.as_str() {
                kinds::LOCK_ACQUIRE => store.acquire(body(&env)?).await,
                kinds::LOCK_RENEW => store.renew(body(&env)?).await,
                kinds::LOCK_RELEASE => store.release(body(&env)?).await,
                kinds::LOCK_CHECK => store.check(body(&env)?).await,
                kinds::LOCK_LIST => store.list().await,
                other => Err(WireError::new(
                    Code::UnknownKind,
                    format!("locker does not handle `{other}`"),
                )),
            }
        })
    }
}

pub async fn setup(ctx: Ctx) -> anyhow::Result<Routes> {
    let Settings {
        database_url: url,
        pool_size,
        sweep_interval,
    } = settings(&ctx.config())?;
    let db = Db::new(&url, pool_size)?;
    let store = Rc::new(Store::new(db));
    let ready = Rc::new(std::cell::Cell::new(false));

    // Migrate before serving locks; retried with backoff while the database is down.
    let (r, u) = (ready.clone(), url.clone());
    ctx.spawn_loop("migrate", LoopKind::Resilient, move || {
        let (r, u) = (r.clone(), u.clone());
        async move {
            if r.get() {
                return std::future::pending().await;
            }
            paddock_db::migrate(&u).await?;
            r.set(true);
            tracing::info!("lock database ready");
            std::future::pending().await
        }
    });
    let (s, r) = (store.clone(), ready.clone());
    ctx.spawn_loop("sweep-expired", LoopKind::Resilient, move || {
        let (s, r) = (s.clone(), r.clone());
        async move {
            loop {
                tokio::time::sleep(sweep_interval).await;
                if r.get() {
                    s.sweep().await?;
                }
            }
        }
    });

    let locker = Locker { store, ready }.start();
    let kinds = [
        kinds::LOCK_ACQUIRE,
        kinds::LOCK_RENEW,
        kinds::LOCK_RELEASE,
        kinds::LOCK_CHECK,
        kinds::LOCK_LIST,
    ];
    Ok(Routes::new().forward(&kinds, locker, Call))
}
