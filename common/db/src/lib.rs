//! PostgreSQL access for every daemon: connect with multi-host URLs
//! (`target_session_attrs=read-write` picks the primary), a pool that drops
//! connections to a demoted (read-only) server, and the embedded migrations, run once
//! under an advisory lock however many daemons start together.
//!
//! Architecture invariant: the only crate that opens PostgreSQL connections. It owns
//! no tables; each daemon's queries live in that daemon.

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
pub use deadpool_postgres::{Object, Transaction};
use tokio_postgres::NoTls;
pub use tokio_postgres::{Client, Error as PgError, Row};

mod embedded {
    refinery::embed_migrations!("../../migrations");
}

/// Arbitrary but fixed: the advisory lock key that serialises migration runs (tests
/// hold it to line runs up).
pub const MIGRATION_LOCK_KEY: i64 = 0x7061_6464_6f63_6b01; // "paddock\x01"

/// SQL run when a pooled connection is reused: it raises on a standby, so a demoted
/// server's connections are evicted (a plain query's result would be ignored).
const RECYCLE_CHECK: &str =
    "DO $$ BEGIN IF pg_is_in_recovery() THEN RAISE EXCEPTION 'server is in recovery (read-only)'; END IF; END $$";

/// A database failure. Its `Display` says what failed; the cause (the driver's
/// error, with PostgreSQL's own message) is its `source()`, so print the whole
/// chain once where the error is handled, e.g. with [`chain`].
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("the database url is not valid")]
    Url(#[source] PgError),
    #[error("cannot connect to PostgreSQL")]
    Connect(#[source] PgError),
    #[error("no PostgreSQL connection available")]
    Pool(#[source] deadpool_postgres::PoolError),
    #[error("cannot build the PostgreSQL connection pool")]
    Build(#[source] deadpool_postgres::BuildError),
    #[error("query failed")]
    Query(#[from] PgError),
    #[error("migration failed")]
    Migrate(#[source] refinery::Error),
}

impl DbError {
    /// Errors that retrying later can fix (server down, failover in progress, a
    /// demoted primary, serialization conflicts).
    pub fn is_transient(&self) -> bool {
        match self {
            DbError::Url(_) | DbError::Build(_) | DbError::Migrate(_) => false,
            DbError::Connect(_) | DbError::Pool(_) => true,
            DbError::Query(e) => is_transient(e),
        }
    }

    /// The driver's error, when there is one (to decide whether a pooled connection
    /// is still usable).
    pub fn pg(&self) -> Option<&PgError> {
        match self {
            DbError::Url(e) | DbError::Connect(e) | DbError::Query(e) => Some(e),
            _ => None,
        }
    }
}

/// An error with its causes, `a: b: c`, each cause once: some errors (tokio-postgres
/// wrapping PostgreSQL's message, deadpool wrapping a connect error) repeat their
/// source in their own text, and a cause already said is not said again.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let part = c.to_string();
        if !s.contains(&part) {
            s.push_str(": ");
            s.push_str(&part);
        }
        cur = c.source();
    }
    s
}

/// SQLSTATE 25006: a write reached a read-only (standby or demoted) server.
pub fn is_read_only(e: &PgError) -> bool {
    e.code() == Some(&tokio_postgres::error::SqlState::READ_ONLY_SQL_TRANSACTION)
}

pub fn is_transient(e: &PgError) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.code() {
        None => true, // I/O or protocol error: the connection is gone
        Some(c) => {
            let s = c.code();
            s.starts_with("08") // connection exception
                || s.starts_with("57P") // admin/crash shutdown, cannot connect now
                || s == "25006" // read-only transaction
                || s == "40001" // serialization failure
                || s == "40P01" // deadlock
                || s == "53300" // too many connections
        }
    }
}

pub fn parse_url(url: &str) -> Result<tokio_postgres::Config, DbError> {
    url.parse::<tokio_postgres::Config>().map_err(DbError::Url)
}

/// One connection, outside the pool (migrations, LISTEN). Its driver task runs on the
/// current runtime.
pub async fn connect(url: &str) -> Result<Client, DbError> {
    let mut cfg = parse_url(url)?;
    if cfg.get_connect_timeout().is_none() {
        cfg.connect_timeout(Duration::from_secs(5));
    }
    let (client, conn) = cfg.connect(NoTls).await.map_err(DbError::Connect)?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!("PostgreSQL connection ended: {}", chain(&e));
        }
    });
    Ok(client)
}

/// A connection pool. Connections are made lazily, so a daemon starts while the
/// database is down and serves `unavailable` until it is back.
#[derive(Clone)]
pub struct Db {
    pool: Pool,
}

impl Db {
    pub fn new(url: &str, max_size: usize) -> Result<Db, DbError> {
        let mut cfg = parse_url(url)?;
        if cfg.get_connect_timeout().is_none() {
            cfg.connect_timeout(Duration::from_secs(5));
        }
        let mgr = Manager::from_config(
            cfg,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Custom(RECYCLE_CHECK.into()),
            },
        );
        let pool = Pool::builder(mgr)
            .max_size(max_size)
            .wait_timeout(Some(Duration::from_secs(5)))
            .create_timeout(Some(Duration::from_secs(5)))
            .recycle_timeout(Some(Duration::from_secs(5)))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(DbError::Build)?;
        Ok(Db { pool })
    }

    pub async fn get(&self) -> Result<Object, DbError> {
        self.pool.get().await.map_err(DbError::Pool)
    }

    /// Call after a query error on `conn`: a read-only server's connection is taken
    /// out of the pool for good so the next `get` reconnects to the new primary.
    pub fn discard_if_broken(conn: Object, err: &PgError) {
        if is_read_only(err) || err.is_closed() {
            drop(Object::take(conn));
        }
    }
}

/// Fails when `client`'s server is in recovery (a standby or a demoted primary):
/// the same check the pool runs before reusing a connection.
pub async fn check_writable(client: &Client) -> Result<(), DbError> {
    client.batch_execute(RECYCLE_CHECK).await?;
    Ok(())
}

/// What a migration run did.
#[derive(Debug, Default)]
pub struct MigrationReport {
    pub applied: Vec<String>,
}

/// Applies the embedded migrations from `migrations/`, holding an advisory lock so
/// concurrent runs apply each step exactly once.
pub async fn migrate(url: &str) -> Result<MigrationReport, DbError> {
    let mut client = connect(url).await?;
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await?;
    let result = embedded::migrations::runner().run_async(&mut client).await;
    let unlock = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK_KEY])
        .await;
    let report = result.map_err(DbError::Migrate)?;
    unlock?;
    let applied = report
        .applied_migrations()
        .iter()
        .map(|m| m.to_string())
        .collect::<Vec<_>>();
    for m in &applied {
        tracing::info!(migration = %m, "applied");
    }
    Ok(MigrationReport { applied })
}

/// Names of the embedded migrations, in order (for `paddock` and tests).
pub fn embedded_migrations() -> Vec<String> {
    embedded::migrations::runner()
        .get_migrations()
        .iter()
        .map(|m| m.to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn errors_keep_their_cause_as_source_and_do_not_repeat_it() {
        let e = parse_url("port=notanumber").unwrap_err();
        let cause = e
            .source()
            .expect("the driver's error is the source")
            .to_string();
        assert!(!e.to_string().contains(&cause), "{e} repeats {cause}");
        let full = chain(&e);
        assert!(full.starts_with(&e.to_string()), "{full}");
        assert!(full.contains(&cause), "{full}");
        assert!(!e.is_transient());
    }

    #[test]
    fn chain_says_each_cause_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer: {0}")]
        struct Repeats(#[source] std::io::Error);
        let e = Repeats(std::io::Error::other("disk on fire"));
        assert_eq!(chain(&e), "outer: disk on fire");
    }
}
