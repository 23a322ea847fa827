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
use std::time::{Duration, Instant};

use actix::prelude::*;
use paddock_config::{ClusterConfig, ConfigError};
use paddock_daemon::{body, Ctx, LoopKind, Routes, Spec};
use paddock_db::{Db, DbError};
use paddock_wire::kinds::{
    self, LockAcquire, LockGrant, LockInfo, LockList, LockRenew, LockToken, LockValid,
};
use paddock_wire::{Code, Envelope, WireError};
use serde_json::Value;
use tokio::sync::Notify;

pub fn spec() -> Spec {
    Spec {
        name: "locker",
        version: env!("CARGO_PKG_VERSION"),
        pull: false,
        publish: false,
        check,
        push_to: paddock_daemon::no_push_to,
    }
}

/// The locker needs a database URL that parses and a sane pool size.
fn check(cfg: &ClusterConfig) -> Result<(), ConfigError> {
    let url = cfg.database_url()?;
    paddock_db::parse_url(url).map_err(|e| cfg.invalid("database.url", e.to_string()))?;
    match cfg.daemon_u64("locker", "pool_size", 8)? {
        1..=256 => Ok(()),
        n => Err(cfg.invalid(
            "daemons.locker.pool_size",
            format!("must be 1-256, not {n}"),
        )),
    }
}

/// Longest lease, and longest wait, a request may ask for.
pub const MAX_TTL_MS: u64 = 24 * 3600 * 1000;
pub const MAX_WAIT_MS: u64 = 5 * 60 * 1000;

fn db_error(e: DbError) -> WireError {
    if e.is_transient() {
        WireError::unavailable(format!(
            "the lock database is unavailable ({e}); retry shortly"
        ))
    } else {
        WireError::internal(format!("lock database error: {e}"))
    }
}

fn check_name(name: &str) -> Result<(), WireError> {
    if name.is_empty() || name.len() > 200 {
        return Err(WireError::invalid("`name` must be 1-200 characters"));
    }
    Ok(())
}

fn check_ttl(ttl_ms: u64) -> Result<(), WireError> {
    if ttl_ms == 0 || ttl_ms > MAX_TTL_MS {
        return Err(WireError::invalid(format!(
            "`ttl_ms` must be between 1 and {MAX_TTL_MS}"
        )));
    }
    Ok(())
}

/// The lease store: SQL over the pool.
pub struct Store {
    db: Db,
    /// Woken when this locker releases a lock, so local waiters retry at once;
    /// waiters also poll, for releases and expiries seen by other lockers.
    released: Notify,
}

enum Attempt {
    Granted(LockGrant),
    Held { owner: String, expires: i64 },
}

const EXPIRES_MS: &str = "(extract(epoch from expires_at) * 1000)::bigint";

impl Store {
    pub fn new(db: Db) -> Store {
        Store {
            db,
            released: Notify::new(),
        }
    }

    async fn try_acquire(&self, name: &str, owner: &str, ttl_ms: u64) -> Result<Attempt, DbError> {
        let mut conn = self.db.get().await?;
        let result = async {
            let tx = conn.transaction().await?;
            // Take the counter row first: it serialises grants, so the check below
            // sees every grant committed before ours.
            let token: i64 = tx
                .query_one("UPDATE lock_fencing SET value = value + 1 WHERE id = 1 RETURNING value", &[])
                .await?
                .get(0);
            let held = tx
                .query_opt(
                    &format!("SELECT owner, {EXPIRES_MS} FROM locks WHERE name = $1 AND expires_at > clock_timestamp() FOR UPDATE"),
                    &[&name],
                )
                .await?;
            if let Some(row) = held {
                tx.rollback().await?;
                return Ok(Attempt::Held {
                    owner: row.get(0),
                    expires: row.get(1),
                });
            }
            let ttl = ttl_ms as i64;
            let expires: i64 = tx
                .query_one(
                    &format!(
                        "INSERT INTO locks (name, owner, token, acquired_at, expires_at)
                         VALUES ($1, $2, $3, clock_timestamp(), clock_timestamp() + $4::bigint * interval '1 millisecond')
                         ON CONFLICT (name) DO UPDATE SET owner = EXCLUDED.owner, token = EXCLUDED.token,
                             acquired_at = EXCLUDED.acquired_at, expires_at = EXCLUDED.expires_at
                         RETURNING {EXPIRES_MS}"
                    ),
                    &[&name, &owner, &token, &ttl],
                )
                .await?
                .get(0);
            tx.commit().await?;
            Ok(Attempt::Granted(LockGrant { token, expires }))
        }
        .await;
        if let Err(e) = &result {
            Db::discard_if_broken(conn, e);
        }
        result.map_err(DbError::Query)
    }

    pub async fn acquire(&self, req: LockAcquire) -> Result<Value, WireError> {
        check_name(&req.name)?;
        check_ttl(req.ttl_ms)?;
        if req.owner.is_empty() || req.owner.len() > 200 {
            return Err(WireError::invalid("`owner` must be 1-200 characters"));
        }
        if req.wait_ms > MAX_WAIT_MS {
            return Err(WireError::invalid(format!(
                "`wait_ms` must be at most {MAX_WAIT_MS}"
            )));
        }
        let deadline = Instant::now() + Duration::from_millis(req.wait_ms);
        let mut poll = Duration::from_millis(10);
        loop {
            match self
                .try_acquire(&req.name, &req.owner, req.ttl_ms)
                .await
                .map_err(db_error)?
            {
                Attempt::Granted(g) => {
                    tracing::debug!(name = %req.name, owner = %req.owner, token = g.token, "granted");
                    return Ok(kinds::to_body(&g));
                }
                Attempt::Held { owner, expires } => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Err(WireError::new(
                            Code::Held,
                            format!("lock `{}` is held by `{owner}`", req.name),
                        )
                        .with("holder", owner)
                        .with("expires", expires));
                    }
                    let wait = poll.min(deadline - now);
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = self.released.notified() => {}
                    }
                    poll = (poll * 2).min(Duration::from_millis(100));
                }
            }
        }
    }

    async fn exec(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<paddock_db::Row>, WireError> {
        let conn = self.db.get().await.map_err(db_error)?;
        match conn.query(sql, params).await {
            Ok(rows) => Ok(rows),
            Err(e) => {
                Db::discard_if_broken(conn, &e);
                Err(db_error(DbError::Query(e)))
            }
        }
    }

    fn stale(name: &str, token: i64) -> WireError {
        WireError::new(
            Code::StaleToken,
            format!("token {token} is not the current grant of lock `{name}` (it expired, was released, or was taken over)"),
        )
    }

    pub async fn renew(&self, req: LockRenew) -> Result<Value, WireError> {
        check_name(&req.name)?;
        check_ttl(req.ttl_ms)?;
        let ttl = req.ttl_ms as i64;
        let rows = self
            .exec(
                &format!(
                    "UPDATE locks SET expires_at = clock_timestamp() + $3::bigint * interval '1 millisecond'
                     WHERE name = $1 AND token = $2 AND expires_at > clock_timestamp() RETURNING {EXPIRES_MS}"
                ),
                &[&req.name, &req.token, &ttl],
            )
            .await?;
        match rows.first() {
            Some(r) => Ok(kinds::to_body(&LockGrant {
                token: req.token,
                expires: r.get(0),
            })),
            None => Err(Self::stale(&req.name, req.token)),
        }
    }

    pub async fn release(&self, req: LockToken) -> Result<Value, WireError> {
        check_name(&req.name)?;
        let rows = self
            .exec(
                "DELETE FROM locks WHERE name = $1 AND token = $2 AND expires_at > clock_timestamp() RETURNING token",
                &[&req.name, &req.token],
            )
            .await?;
        if rows.is_empty() {
            return Err(Self::stale(&req.name, req.token));
        }
        self.released.notify_waiters();
        Ok(serde_json::json!({}))
    }

    pub async fn check(&self, req: LockToken) -> Result<Value, WireError> {
        check_name(&req.name)?;
        let rows = self
            .exec(
                "SELECT 1 FROM locks WHERE name = $1 AND token = $2 AND expires_at > clock_timestamp()",
                &[&req.name, &req.token],
            )
            .await?;
        Ok(kinds::to_body(&LockValid {
            valid: !rows.is_empty(),
        }))
    }

    pub async fn list(&self) -> Result<Value, WireError> {
        let rows = self
            .exec(
                &format!("SELECT name, owner, token, {EXPIRES_MS} FROM locks WHERE expires_at > clock_timestamp() ORDER BY name"),
                &[],
            )
            .await?;
        let locks = rows
            .iter()
            .map(|r| LockInfo {
                name: r.get(0),
                owner: r.get(1),
                token: r.get(2),
                expires: r.get(3),
            })
            .collect();
        Ok(kinds::to_body(&LockList { locks }))
    }

    /// Deletes long-expired rows (they are overwritten on acquire anyway; this keeps
    /// the table small).
    pub async fn sweep(&self) -> Result<u64, DbError> {
        let conn = self.db.get().await?;
        Ok(conn
            .execute(
                "DELETE FROM locks WHERE expires_at < clock_timestamp() - interval '1 minute'",
                &[],
            )
            .await?)
    }
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
    let cfg = ctx.config();
    let url = cfg.database_url()?.to_string();
    let pool_size = cfg.daemon_u64("locker", "pool_size", 8)? as usize;
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
                tokio::time::sleep(Duration::from_secs(10)).await;
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
