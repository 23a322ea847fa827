//! The lease store: SQL over the pool, and what each database failure means for the
//! caller (nothing done, or an unknown outcome).

use std::time::{Duration, Instant};

use paddock_db::{Db, DbError, Object, PgError};
use paddock_wire::kinds::{
    self, LockAcquire, LockGrant, LockInfo, LockList, LockRenew, LockToken, LockValid,
};
use paddock_wire::{Code, WireError};
use serde_json::Value;
use tokio::sync::Notify;
use tokio_postgres::Transaction;

/// Longest lease, and longest wait, a request may ask for.
pub const MAX_TTL_MS: u64 = 24 * 3600 * 1000;
pub const MAX_WAIT_MS: u64 = 5 * 60 * 1000;

const EXPIRES_MS: &str = "(extract(epoch from expires_at) * 1000)::bigint";

/// Extends the lease of the current unexpired grant `$2` of lock `$1` by `$3` ms.
pub const RENEW_SQL: &str =
    "UPDATE locks SET expires_at = clock_timestamp() + $3::bigint * interval '1 millisecond'
     WHERE name = $1 AND token = $2 AND expires_at > clock_timestamp()
     RETURNING (extract(epoch from expires_at) * 1000)::bigint";

/// The step of a write at which the database failed. It decides what the caller
/// may be told: before COMMIT was sent nothing was done; once COMMIT was sent and no
/// answer came (or an error came: PostgreSQL can end a session whose commit is
/// already durable locally while it waits for a synchronous standby), the change
/// may or may not have been made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Getting a connection, or any statement before COMMIT, or a read.
    BeforeCommit,
    /// The COMMIT itself.
    Commit,
}

/// A database failure and the step it happened at.
#[derive(Debug, thiserror::Error)]
#[error("{}", match .stage { Stage::BeforeCommit => "lock database request failed", Stage::Commit => "lock database commit failed" })]
pub struct StoreError {
    pub stage: Stage,
    #[source]
    pub source: DbError,
}

impl StoreError {
    fn before(e: impl Into<DbError>) -> StoreError {
        StoreError {
            stage: Stage::BeforeCommit,
            source: e.into(),
        }
    }

    fn commit(e: PgError) -> StoreError {
        StoreError {
            stage: Stage::Commit,
            source: DbError::Query(e),
        }
    }

    /// The reply for this failure. `unavailable` promises that nothing was done (the
    /// server forgets the request id and the client resends the same message), so it
    /// is only used before COMMIT; a failed COMMIT is `unknown_outcome`.
    pub fn to_wire(&self) -> WireError {
        let why = paddock_db::chain(&self.source);
        match self.stage {
            Stage::Commit => WireError::new(
                Code::UnknownOutcome,
                format!(
                    "the lock database failed while committing ({why}); the change may or may not \
                     have been made: re-issue the request to learn which (an acquire by the same \
                     owner returns its grant if it was made)"
                ),
            ),
            Stage::BeforeCommit if self.source.is_transient() => WireError::unavailable(format!(
                "the lock database is unavailable ({why}); nothing was done, retry shortly"
            )),
            Stage::BeforeCommit => WireError::internal(format!("lock database error: {why}")),
        }
    }
}

/// Runs after a failed step on `conn`: a broken or read-only connection leaves the
/// pool for good (the next `get` reconnects, to the new primary after a failover).
fn discard_if_broken(conn: Object, e: &StoreError) {
    if let Some(pg) = e.source.pg() {
        Db::discard_if_broken(conn, pg);
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

/// What one acquire attempt found.
#[derive(Debug, PartialEq)]
pub enum Attempt {
    /// A new grant, committed.
    Granted(LockGrant),
    /// The owner already holds the current grant (a re-issued acquire): that grant,
    /// unchanged.
    AlreadyHeld(LockGrant),
    Held {
        owner: String,
        expires: i64,
    },
    /// The guarded upsert found an unexpired lease after all (cannot happen while
    /// the row lock is held); try again.
    Raced,
}

/// The lease store: SQL over the pool.
pub struct Store {
    db: Db,
    /// Woken when this locker releases a lock, so local waiters retry at once;
    /// waiters also poll, for releases and expiries seen by other lockers.
    released: Notify,
}

impl Store {
    pub fn new(db: Db) -> Store {
        Store {
            db,
            released: Notify::new(),
        }
    }

    /// One try to take `name` for `owner`, in one transaction.
    pub async fn try_acquire(
        &self,
        name: &str,
        owner: &str,
        ttl_ms: u64,
    ) -> Result<Attempt, StoreError> {
        let mut conn = self.db.get().await.map_err(StoreError::before)?;
        let result = Self::acquire_tx(&mut conn, name, owner, ttl_ms).await;
        if let Err(e) = &result {
            discard_if_broken(conn, e);
        }
        result
    }

    async fn acquire_tx(
        conn: &mut Object,
        name: &str,
        owner: &str,
        ttl_ms: u64,
    ) -> Result<Attempt, StoreError> {
        let tx = conn.transaction().await.map_err(StoreError::before)?;
        // Take the counter row first: it serialises grants, so the check below sees
        // every grant committed before ours, and tokens grow in commit order.
        let token: i64 = tx
            .query_one(
                "UPDATE lock_fencing SET value = value + 1 WHERE id = 1 RETURNING value",
                &[],
            )
            .await
            .map_err(StoreError::before)?
            .get(0);
        // Lock the lease row whatever its expiry. A filter on expiry here would skip
        // (and not lock) a row whose renew is committing right now, and the upsert
        // below would then overwrite the just-renewed lease: two holders. Locked, a
        // row being renewed is waited for and then read as renewed.
        let row = tx
            .query_opt(
                &format!(
                    "SELECT owner, token, {EXPIRES_MS}, expires_at > clock_timestamp()
                     FROM locks WHERE name = $1 FOR UPDATE"
                ),
                &[&name],
            )
            .await
            .map_err(StoreError::before)?;
        if let Some(row) = row {
            let live: bool = row.get(3);
            if live {
                let holder: String = row.get(0);
                let current = LockGrant {
                    token: row.get(1),
                    expires: row.get(2),
                };
                tx.rollback().await.map_err(StoreError::before)?;
                return Ok(if holder == owner {
                    Attempt::AlreadyHeld(current)
                } else {
                    Attempt::Held {
                        owner: holder,
                        expires: current.expires,
                    }
                });
            }
        }
        let ttl = ttl_ms as i64;
        // The guard is a second wall: never overwrite an unexpired lease.
        let granted = tx
            .query_opt(
                &format!(
                    "INSERT INTO locks (name, owner, token, acquired_at, expires_at)
                     VALUES ($1, $2, $3, clock_timestamp(), clock_timestamp() + $4::bigint * interval '1 millisecond')
                     ON CONFLICT (name) DO UPDATE SET owner = EXCLUDED.owner, token = EXCLUDED.token,
                         acquired_at = EXCLUDED.acquired_at, expires_at = EXCLUDED.expires_at
                         WHERE locks.expires_at <= clock_timestamp()
                     RETURNING {EXPIRES_MS}"
                ),
                &[&name, &owner, &token, &ttl],
            )
            .await
            .map_err(StoreError::before)?;
        let Some(row) = granted else {
            // Unreachable while the row lock above is held.
            tx.rollback().await.map_err(StoreError::before)?;
            return Ok(Attempt::Raced);
        };
        let expires: i64 = row.get(0);
        tx.commit().await.map_err(StoreError::commit)?;
        Ok(Attempt::Granted(LockGrant { token, expires }))
    }

    /// `lock.acquire`: tries, and while the lock is held and `wait_ms` lasts, waits
    /// (woken by local releases, polling 10 → 100 ms for the rest).
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
                .map_err(|e| reply_error(&e))?
            {
                Attempt::Granted(g) => {
                    tracing::debug!(name = %req.name, owner = %req.owner, token = g.token, "granted");
                    return Ok(kinds::to_body(&g));
                }
                Attempt::AlreadyHeld(g) => {
                    tracing::debug!(name = %req.name, owner = %req.owner, token = g.token, "re-issued acquire: the owner's grant");
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
                    let wait = poll.min(deadline.saturating_duration_since(now));
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = self.released.notified() => {}
                    }
                    poll = (poll * 2).min(Duration::from_millis(100));
                }
                Attempt::Raced => {}
            }
        }
    }

    /// Runs one write statement in its own transaction, so a failure before COMMIT
    /// is told apart from a failure of the COMMIT.
    async fn write(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Option<paddock_db::Row>, StoreError> {
        let mut conn = self.db.get().await.map_err(StoreError::before)?;
        let result = async {
            let tx = conn.transaction().await.map_err(StoreError::before)?;
            let row = Self::write_in(&tx, sql, params).await?;
            if row.is_none() {
                tx.rollback().await.map_err(StoreError::before)?;
                return Ok(None);
            }
            tx.commit().await.map_err(StoreError::commit)?;
            Ok(row)
        }
        .await;
        if let Err(e) = &result {
            discard_if_broken(conn, e);
        }
        result
    }

    async fn write_in(
        tx: &Transaction<'_>,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Option<paddock_db::Row>, StoreError> {
        tx.query_opt(sql, params).await.map_err(StoreError::before)
    }

    /// A read: whatever fails, nothing was done.
    async fn read(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<paddock_db::Row>, WireError> {
        let conn = self
            .db
            .get()
            .await
            .map_err(|e| reply_error(&StoreError::before(e)))?;
        match conn.query(sql, params).await {
            Ok(rows) => Ok(rows),
            Err(e) => {
                let e = StoreError::before(e);
                discard_if_broken(conn, &e);
                Err(reply_error(&e))
            }
        }
    }

    fn stale(name: &str, token: i64) -> WireError {
        WireError::new(
            Code::StaleToken,
            format!("token {token} is not the current grant of lock `{name}` (it expired, was released, or was taken over)"),
        )
    }

    /// Renews inside `tx` (the statement `lock.renew` runs); `None` when `token` is
    /// not the current unexpired grant.
    pub async fn renew_in(
        tx: &Transaction<'_>,
        name: &str,
        token: i64,
        ttl_ms: u64,
    ) -> Result<Option<LockGrant>, StoreError> {
        let ttl = ttl_ms as i64;
        Ok(Self::write_in(tx, RENEW_SQL, &[&name, &token, &ttl])
            .await?
            .map(|r| LockGrant {
                token,
                expires: r.get(0),
            }))
    }

    pub async fn renew(&self, req: LockRenew) -> Result<Value, WireError> {
        check_name(&req.name)?;
        check_ttl(req.ttl_ms)?;
        let ttl = req.ttl_ms as i64;
        let row = self
            .write(RENEW_SQL, &[&req.name, &req.token, &ttl])
            .await
            .map_err(|e| reply_error(&e))?;
        match row {
            Some(r) => Ok(kinds::to_body(&LockGrant {
                token: req.token,
                expires: r.get(0),
            })),
            None => Err(Self::stale(&req.name, req.token)),
        }
    }

    pub async fn release(&self, req: LockToken) -> Result<Value, WireError> {
        check_name(&req.name)?;
        let row = self
            .write(
                "DELETE FROM locks WHERE name = $1 AND token = $2 AND expires_at > clock_timestamp() RETURNING token",
                &[&req.name, &req.token],
            )
            .await
            .map_err(|e| reply_error(&e))?;
        if row.is_none() {
            return Err(Self::stale(&req.name, req.token));
        }
        self.released.notify_waiters();
        Ok(serde_json::json!({}))
    }

    pub async fn check(&self, req: LockToken) -> Result<Value, WireError> {
        check_name(&req.name)?;
        let rows = self
            .read(
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
            .read(
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

/// The reply for a failed database step, logged once here with its whole chain.
pub fn reply_error(e: &StoreError) -> WireError {
    let w = e.to_wire();
    match w.code {
        Code::Unavailable => tracing::debug!("{}", w.message),
        Code::UnknownOutcome => tracing::warn!("{}", w.message),
        _ => tracing::error!("{}", w.message),
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pg_err() -> PgError {
        // A real driver error without a server: a url that does not parse.
        "port=notanumber"
            .parse::<tokio_postgres::Config>()
            .unwrap_err()
    }

    #[test]
    fn a_failed_commit_is_an_unknown_outcome_and_an_earlier_failure_is_unavailable() {
        let pool_down = || {
            DbError::Pool(deadpool_postgres::PoolError::Timeout(
                deadpool_postgres::TimeoutType::Create,
            ))
        };
        // A failure of the COMMIT step, whatever the error: the change may be made.
        let e = StoreError::commit(pg_err());
        assert_eq!(e.to_wire().code, Code::UnknownOutcome);
        assert!(
            e.to_wire().message.contains("re-issue"),
            "{}",
            e.to_wire().message
        );
        // Anything before COMMIT: nothing was done; transient ones may be resent.
        let e = StoreError::before(pool_down());
        assert_eq!(e.to_wire().code, Code::Unavailable);
        assert!(e.to_wire().message.contains("nothing was done"));
        // A lost connection (a driver error without SQLSTATE) before COMMIT too.
        let e = StoreError::before(pg_err());
        assert_eq!(e.to_wire().code, Code::Unavailable);
        // A permanent one is `internal`, never resent.
        let e = StoreError::before(DbError::Url(pg_err()));
        assert_eq!(e.to_wire().code, Code::Internal);
        // The chain is kept: the store error's source is the database error.
        let e = StoreError::commit(pg_err());
        assert!(std::error::Error::source(&e).is_some());
        assert!(!e.to_string().contains("invalid"), "{e}");
    }
}
