//! The `deployer_builds` table: every query the deployer makes.

use paddock_db::{Db, DbError};
use paddock_wire::{Code, WireError};
use serde_json::{json, Value};

/// A new build's record.
pub struct NewBuild<'a> {
    pub id: &'a str,
    pub app: &'a str,
    pub commit: &'a str,
    pub source: &'a str,
    pub git_ref: &'a str,
    pub pusher: &'a str,
    pub node: &'a str,
}

/// How a build ended.
pub struct Outcome<'a> {
    pub status: &'a str,
    pub step: Option<&'a str>,
    pub error: Option<Value>,
    pub release: Option<Value>,
    pub durations: Value,
}

pub struct Store {
    db: Db,
}

/// A database failure as the wire says it: retry later.
pub fn db_err(e: DbError) -> WireError {
    tracing::warn!("database: {}", paddock_db::chain(&e));
    WireError::unavailable(format!(
        "the deployer's database is unavailable ({}); retry shortly",
        paddock_db::chain(&e)
    ))
}

const COLUMNS: &str = "id, app, commit, status, step, pusher, ref, node, error, release, durations,
     (extract(epoch from started_at) * 1000)::bigint,
     (extract(epoch from finished_at) * 1000)::bigint";

fn row_json(r: &tokio_postgres::Row) -> Value {
    let mut v = json!({
        "id": r.get::<_, String>(0),
        "app": r.get::<_, String>(1),
        "commit": r.get::<_, String>(2),
        "status": r.get::<_, String>(3),
        "pusher": r.get::<_, String>(5),
        "ref": r.get::<_, String>(6),
        "node": r.get::<_, String>(7),
        "durations": r.get::<_, Value>(10),
        "started_at": r.get::<_, i64>(11),
        "finished_at": r.get::<_, Option<i64>>(12),
    });
    if let Some(s) = r.get::<_, Option<String>>(4) {
        v["step"] = json!(s);
    }
    if let Some(e) = r.get::<_, Option<Value>>(8) {
        v["error"] = e;
    }
    if let Some(rel) = r.get::<_, Option<Value>>(9) {
        v["release"] = rel;
    }
    v
}

impl Store {
    pub fn new(db: Db) -> Store {
        Store { db }
    }

    /// Records a running build; `conflict` while another build of the app runs.
    /// A build still `running` long after any build could have ended (its
    /// deployer's node died and never came back) is failed first, so it does
    /// not block the app for ever.
    pub async fn insert(&self, b: &NewBuild<'_>, stale_after_ms: i64) -> Result<(), WireError> {
        let c = self.db.get().await.map_err(db_err)?;
        c.execute(
            "UPDATE deployer_builds SET status = 'failed', finished_at = clock_timestamp(),
                    error = jsonb_build_object('step', coalesce(step, 'source'), 'message',
                        'its deployer stopped answering during this build; push again')
             WHERE app = $1 AND status = 'running'
               AND started_at < clock_timestamp() - make_interval(secs => $2::bigint / 1000.0)",
            &[&b.app, &stale_after_ms],
        )
        .await
        .map_err(|e| db_err(DbError::Query(e)))?;
        let r = c
            .execute(
                "INSERT INTO deployer_builds (id, app, commit, source, ref, pusher, node, status, step)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, 'running', 'source')",
                &[&b.id, &b.app, &b.commit, &b.source, &b.git_ref, &b.pusher, &b.node],
            )
            .await;
        match r {
            Ok(_) => Ok(()),
            Err(e)
                if e.as_db_error().and_then(|d| d.constraint()) == Some("deployer_builds_pkey") =>
            {
                Err(WireError::new(
                    Code::Conflict,
                    format!("build {} exists already; give another id or none", b.id),
                ))
            }
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {
                let running: Option<String> = c
                    .query_opt(
                        "SELECT id FROM deployer_builds WHERE app = $1 AND status = 'running'",
                        &[&b.app],
                    )
                    .await
                    .ok()
                    .flatten()
                    .map(|r| r.get(0));
                Err(WireError::new(
                    Code::Conflict,
                    format!(
                        "app {} is already being built ({}); wait for it to finish",
                        b.app,
                        running.unwrap_or_else(|| "another build".into())
                    ),
                ))
            }
            Err(e) => {
                Db::discard_if_broken(c, &e);
                Err(db_err(DbError::Query(e)))
            }
        }
    }

    /// Appends log lines and notes the current step.
    pub async fn append(&self, id: &str, lines: &[String], step: &str) -> Result<(), DbError> {
        let c = self.db.get().await?;
        if lines.is_empty() {
            c.execute(
                "UPDATE deployer_builds SET step = $2 WHERE id = $1 AND step IS DISTINCT FROM $2",
                &[&id, &step],
            )
            .await?;
            return Ok(());
        }
        let mut text = String::new();
        for l in lines {
            text.push_str(l);
            text.push('\n');
        }
        let n = lines.len() as i32;
        c.execute(
            "UPDATE deployer_builds SET log = log || $2, log_lines = log_lines + $3, step = $4 WHERE id = $1",
            &[&id, &text, &n, &step],
        )
        .await?;
        Ok(())
    }

    pub async fn finish(&self, id: &str, o: &Outcome<'_>) -> Result<(), DbError> {
        let c = self.db.get().await?;
        c.execute(
            "UPDATE deployer_builds SET status = $2, step = $3, error = $4, release = $5,
                    durations = $6, finished_at = clock_timestamp() WHERE id = $1",
            &[&id, &o.status, &o.step, &o.error, &o.release, &o.durations],
        )
        .await?;
        Ok(())
    }

    /// Builds this node left running when its deployer stopped: they never finish.
    pub async fn fail_orphans(&self, node: &str) -> Result<u64, DbError> {
        let c = self.db.get().await?;
        Ok(c.execute(
            "UPDATE deployer_builds SET status = 'failed', finished_at = clock_timestamp(),
                    error = jsonb_build_object('step', coalesce(step, 'source'), 'message',
                        'the deployer stopped during this build; push again'),
                    log = log || E'\\n !     The deployer stopped during this build; push again.\\n',
                    log_lines = log_lines + 2
             WHERE node = $1 AND status = 'running'",
            &[&node],
        )
        .await?)
    }

    /// Drops the app's oldest finished builds beyond `keep`.
    pub async fn prune(&self, app: &str, keep: u32) -> Result<u64, DbError> {
        let c = self.db.get().await?;
        Ok(c.execute(
            "DELETE FROM deployer_builds WHERE app = $1 AND status <> 'running' AND id NOT IN
               (SELECT id FROM deployer_builds WHERE app = $1 ORDER BY started_at DESC LIMIT $2)",
            &[&app, &(keep as i64)],
        )
        .await?)
    }

    pub async fn list(&self, app: &str, limit: i64) -> Result<Vec<Value>, WireError> {
        let c = self.db.get().await.map_err(db_err)?;
        let rows = c
            .query(
                &format!(
                    "SELECT {COLUMNS} FROM deployer_builds WHERE app = $1
                     ORDER BY started_at DESC, id DESC LIMIT $2"
                ),
                &[&app, &limit],
            )
            .await
            .map_err(|e| db_err(DbError::Query(e)))?;
        Ok(rows.iter().map(row_json).collect())
    }

    /// The build with its whole log, or `None`.
    pub async fn info(&self, id: &str) -> Result<Option<(Value, String)>, WireError> {
        let c = self.db.get().await.map_err(db_err)?;
        let row = c
            .query_opt(
                &format!("SELECT {COLUMNS}, log FROM deployer_builds WHERE id = $1"),
                &[&id],
            )
            .await
            .map_err(|e| db_err(DbError::Query(e)))?;
        Ok(row.map(|r| (row_json(&r), r.get::<_, String>(13))))
    }
}
