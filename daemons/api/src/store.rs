//! The api's tables: every kind's SQL, each change in one transaction with its
//! audit row. No state is kept in memory: any number of apis may share the database.

use std::collections::BTreeMap;

use deadpool_postgres::GenericClient;
use paddock_db::{Db, PgError};
use paddock_wire::keyring::{UserKeys, USER_KEY_PREFIX};
use paddock_wire::{Code, WireError};
use serde_json::{json, Map, Value};
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use crate::auth::{check_app, check_self, forbidden, Need, Role, Who};
use crate::body::{limit, Body};
use crate::names;
use crate::sshkey;

/// Defaults for a new process type's size (Heroku's standard-1X is 512 MB).
pub const DEFAULT_MEMORY_MB: i32 = 512;
pub const DEFAULT_PIDS: i32 = 256;

/// At most this many entries in one `formation.scale`.
pub const MAX_SCALE_CHANGES: usize = 50;

/// `blob.referenced` without `keep`: each app's newest this many releases.
pub const DEFAULT_KEEP_RELEASES: i32 = 10;

/// The scheduler's audit rows read for one `deploy.list` / `deploy.info` at most.
pub const MAX_DEPLOY_EVENTS: i64 = 20_000;

pub struct Store {
    db: Db,
    users: UserKeys,
    apps_domain: Option<String>,
    /// Live user keys recently resolved, so a busy customer's every request
    /// does not read its key first (`KEY_CACHE_TTL`; see `resolve`).
    keys: std::cell::RefCell<KeyCache>,
}

/// How long a resolved live key is trusted without reading it again. A key
/// revoked (or a user disabled) through this api is refused at once (the cache
/// is cleared before the reply); through another api, within this.
const KEY_CACHE_TTL: std::time::Duration = std::time::Duration::from_secs(1);
/// Entries at most; past it the cache starts again empty.
const KEY_CACHE_MAX: usize = 10_000;

#[derive(Default)]
struct KeyCache {
    live: std::collections::HashMap<String, (Who, std::time::Instant)>,
    /// Bumped by every clear: a lookup that began before a clear does not
    /// store what it read (it may predate the revocation).
    generation: u64,
}

/// A change that subscribers should hear of once it has committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changed {
    pub app: String,
    pub what: &'static str,
}

/// A reply and the changes it made.
pub type Reply = (Value, Vec<Changed>);

fn changed(app: &str, what: &'static str) -> Vec<Changed> {
    vec![Changed {
        app: app.to_string(),
        what,
    }]
}

/// A database failure before COMMIT: nothing was done.
pub fn pg(e: PgError) -> WireError {
    if let Some(db) = e.as_db_error() {
        if db.code() == &tokio_postgres::error::SqlState::UNIQUE_VIOLATION {
            return WireError::new(Code::Conflict, format!("already exists ({})", db.message()));
        }
    }
    let why = paddock_db::chain(&e);
    if paddock_db::is_transient(&e) {
        WireError::unavailable(format!(
            "the api's database is unavailable ({why}); nothing was done, retry shortly"
        ))
    } else {
        WireError::internal(format!("database error: {why}"))
    }
}

fn pool(e: paddock_db::DbError) -> WireError {
    WireError::unavailable(format!(
        "the api's database is unavailable ({}); nothing was done, retry shortly",
        paddock_db::chain(&e)
    ))
}

async fn commit(tx: deadpool_postgres::Transaction<'_>) -> Result<(), WireError> {
    tx.commit().await.map_err(|e| {
        WireError::new(
            Code::UnknownOutcome,
            format!(
                "the api's database failed while committing ({}); the change may or may not have been made: look before repeating it",
                paddock_db::chain(&e)
            ),
        )
    })
}

async fn q(
    c: &impl GenericClient,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<Row>, WireError> {
    let st = c.prepare_cached(sql).await.map_err(pg)?;
    c.query(&st, params).await.map_err(pg)
}

async fn q1(
    c: &impl GenericClient,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Option<Row>, WireError> {
    Ok(q(c, sql, params).await?.into_iter().next())
}

async fn exec(
    c: &impl GenericClient,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<u64, WireError> {
    let st = c.prepare_cached(sql).await.map_err(pg)?;
    c.execute(&st, params).await.map_err(pg)
}

tokio::task_local! {
    /// The id of the message being answered (set by `Api::handle`): every change
    /// records it with its audit row.
    pub static REQUEST_ID: String;
}

/// Writes the audit row of a change, in the change's transaction. The app is
/// recorded by id as well as name: its log is read by id, so a later app of the
/// same name never sees it.
async fn audit(
    c: &impl GenericClient,
    who: &Who,
    kind: &str,
    app: Option<&AppRow>,
    detail: Value,
) -> Result<i64, WireError> {
    let (app_id, app) = (app.map(|a| a.id), app.map(|a| a.name.as_str()));
    let request = REQUEST_ID.try_with(String::clone).ok();
    let st = c
        .prepare_cached(
            "INSERT INTO api_audit (actor, key_id, kind, app, app_id, detail, request_id)
             VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
        )
        .await
        .map_err(pg)?;
    let rows = c
        .query(
            &st,
            &[
                &who.actor(),
                &who.key_id(),
                &kind,
                &app,
                &app_id,
                &detail,
                &request,
            ],
        )
        .await
        .map_err(|e| audit_error(e, request.as_deref()))?;
    let row = rows
        .into_iter()
        .next()
        .ok_or_else(|| WireError::internal("audit insert returned nothing"))?;
    Ok(row.get(0))
}

/// An audit insert's error: the same message made a change already, before this
/// api's replay cache began (it restarted before the reply went out), is a
/// `replay`, never a second change.
fn audit_error(e: PgError, request: Option<&str>) -> WireError {
    if e.as_db_error().and_then(|d| d.constraint()) == Some("api_audit_request") {
        WireError::new(
            Code::Replay,
            format!(
                "message {} was already acted on (the api restarted before it could answer); look at the result before repeating it",
                request.unwrap_or("?")
            ),
        )
    } else {
        pg(e)
    }
}

fn not_found(what: impl Into<String>) -> WireError {
    WireError::new(Code::NotFound, what)
}

fn conflict(what: impl Into<String>) -> WireError {
    WireError::new(Code::Conflict, what)
}

/// An app the caller may touch.
struct AppRow {
    id: i64,
    name: String,
    role: Option<Role>,
}

const MS: &str = "(extract(epoch from created_at) * 1000)::bigint";

const RELEASE_COLS: &str =
    "r.version, r.slug, r.process_types, r.config, r.healthchecks, r.description, \
     r.created_by, r.status, r.status_message, (extract(epoch from r.created_at) * 1000)::bigint, \
     a.current_release, r.scheduling";

/// `RELEASE_COLS` for lists: the config's names only (an object with null
/// values), so a list does not carry every release's values from the database.
const RELEASE_LIST_COLS: &str = "r.version, r.slug, r.process_types, \
     (SELECT coalesce(jsonb_object_agg(k, null), '{}'::jsonb) FROM jsonb_object_keys(r.config) k), \
     r.healthchecks, r.description, \
     r.created_by, r.status, r.status_message, (extract(epoch from r.created_at) * 1000)::bigint, \
     a.current_release, r.scheduling";

fn release_json(r: &Row, with_config: bool) -> Value {
    let version: i32 = r.get(0);
    let config: Value = r.get(3);
    let names: Vec<&String> = config
        .as_object()
        .map(|m| m.keys().collect())
        .unwrap_or_default();
    let current: Option<i32> = r.get(10);
    let mut v = json!({
        "version": version,
        "slug": r.get::<_, Option<String>>(1),
        "process_types": r.get::<_, Value>(2),
        "config_names": names,
        "healthchecks": r.get::<_, Value>(4),
        "description": r.get::<_, String>(5),
        "created_by": r.get::<_, String>(6),
        "status": r.get::<_, String>(7),
        "status_message": r.get::<_, String>(8),
        "created_at": r.get::<_, i64>(9),
        "current": current == Some(version),
        "scheduling": r.get::<_, Value>(11),
    });
    if with_config {
        v["config"] = config;
    }
    v
}

/// A fresh user key: id, HMAC secret (derived, never stored), CURVE keypair.
struct NewKey {
    key_id: String,
    secret: String,
    curve_public: String,
    curve_secret: String,
}

impl Store {
    pub fn new(db: Db, users: UserKeys, apps_domain: Option<String>) -> Store {
        Store {
            db,
            users,
            apps_domain,
            keys: Default::default(),
        }
    }

    /// Forgets every resolved key: after any change to keys or users.
    pub fn forget_keys(&self) {
        let mut k = self.keys.borrow_mut();
        k.live.clear();
        k.generation += 1;
    }

    async fn conn(&self) -> Result<paddock_db::Object, WireError> {
        self.db.get().await.map_err(pool)
    }

    fn new_key(&self) -> Result<NewKey, WireError> {
        let key_id = format!(
            "{USER_KEY_PREFIX}{}",
            ulid::Ulid::new().to_string().to_lowercase()
        );
        let secret = self
            .users
            .secret(&key_id)
            .ok_or_else(|| WireError::internal("cannot derive a user key"))?;
        let (curve_public, curve_secret) = paddock_wire::curve::generate()
            .map_err(|e| WireError::internal(format!("cannot make a CURVE keypair: {e}")))?;
        Ok(NewKey {
            key_id,
            secret: hex::encode(secret),
            curve_public,
            curve_secret,
        })
    }

    /// Who signed: the cluster, or a live user key (else `unknown_key`).
    pub async fn resolve(&self, key_id: &str, user: bool, from: &str) -> Result<Who, WireError> {
        if !user {
            return Ok(Who::Cluster {
                from: from.to_string(),
                key_id: key_id.to_string(),
            });
        }
        let generation = {
            let k = self.keys.borrow();
            if let Some((who, at)) = k.live.get(key_id) {
                if at.elapsed() < KEY_CACHE_TTL {
                    return Ok(who.clone());
                }
            }
            k.generation
        };
        let c = self.conn().await?;
        let row = q1(
            &c,
            "SELECT u.id, u.name, u.admin, u.disabled, k.revoked_at IS NOT NULL
             FROM api_keys k JOIN api_users u ON u.id = k.user_id WHERE k.key_id = $1",
            &[&key_id],
        )
        .await?;
        match row {
            Some(r) if !r.get::<_, bool>(3) && !r.get::<_, bool>(4) => {
                let who = Who::User {
                    id: r.get(0),
                    name: r.get(1),
                    admin: r.get(2),
                    key_id: key_id.to_string(),
                };
                let mut k = self.keys.borrow_mut();
                if k.generation == generation {
                    if k.live.len() >= KEY_CACHE_MAX {
                        k.live.clear();
                    }
                    k.live
                        .insert(key_id.to_string(), (who.clone(), std::time::Instant::now()));
                }
                Ok(who)
            }
            Some(r) if r.get::<_, bool>(3) => Err(WireError::new(
                Code::UnknownKey,
                format!(
                    "user {} is disabled; ask your operator",
                    r.get::<_, String>(1)
                ),
            )),
            Some(_) => Err(WireError::new(
                Code::UnknownKey,
                format!(
                    "key {key_id} was revoked; log in again with new credentials (`paddock login`)"
                ),
            )),
            None => Err(WireError::new(
                Code::UnknownKey,
                format!("key {key_id} is not known to this cluster's api"),
            )),
        }
    }

    /// The CURVE keys of every live user key (the rpc socket admits them).
    pub async fn admitted_curve_keys(&self) -> Result<Vec<String>, WireError> {
        let c = self.conn().await?;
        let rows = q(
            &c,
            "SELECT k.curve_public FROM api_keys k JOIN api_users u ON u.id = k.user_id
             WHERE k.revoked_at IS NULL AND NOT u.disabled",
            &[],
        )
        .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    async fn app_for(
        &self,
        c: &impl GenericClient,
        who: &Who,
        name: &str,
        need: Need,
        what: &str,
        lock: bool,
    ) -> Result<AppRow, WireError> {
        names::app(name).map_err(|_| not_found(format!("app {name:?} does not exist")))?;
        let sql = if lock {
            "SELECT a.id, a.name, (SELECT role FROM api_access WHERE app_id = a.id AND user_id = $2)
             FROM api_apps a WHERE a.name = $1 FOR UPDATE OF a"
        } else {
            "SELECT a.id, a.name, (SELECT role FROM api_access WHERE app_id = a.id AND user_id = $2)
             FROM api_apps a WHERE a.name = $1"
        };
        let uid = who.user_id().unwrap_or(-1);
        let row = q1(c, sql, &[&name, &uid]).await?.ok_or_else(|| {
            not_found(format!(
                "app {name} does not exist (`paddock apps` lists yours)"
            ))
        })?;
        let role = row
            .get::<_, Option<String>>(2)
            .and_then(|r| Role::parse(&r));
        check_app(who, role, need, name, what)?;
        Ok(AppRow {
            id: row.get(0),
            name: row.get(1),
            role,
        })
    }

    /// A connection and the app `b` names, which `who` must have access to
    /// (owner, collaborator, admin or the cluster) to `what`.
    async fn readable(
        &self,
        who: &Who,
        b: &Body<'_>,
        what: &str,
    ) -> Result<(paddock_db::Object, AppRow), WireError> {
        let c = self.conn().await?;
        let app = self
            .app_for(&c, who, b.str("app")?, Need::Access, what, false)
            .await?;
        Ok((c, app))
    }

    async fn user_id(&self, c: &impl GenericClient, name: &str) -> Result<i64, WireError> {
        q1(c, "SELECT id FROM api_users WHERE name = $1", &[&name])
            .await?
            .map(|r| r.get(0))
            .ok_or_else(|| not_found(format!("user {name} does not exist")))
    }

    /// The user a `user` field names, or the caller; refuses another's unless admin.
    fn target_user<'a>(&self, who: &'a Who, b: &Body<'a>, what: &str) -> Result<String, WireError> {
        match b.opt_str("user")? {
            Some(u) => {
                check_self(who, u, what)?;
                Ok(u.to_string())
            }
            None => who
                .user_name()
                .map(str::to_string)
                .ok_or_else(|| WireError::invalid("`user` is required when the cluster key asks")),
        }
    }

    // ---- identity ----------------------------------------------------------

    pub async fn whoami(&self, who: &Who) -> Result<Reply, WireError> {
        Ok((
            match who {
                Who::Cluster { key_id, from } => {
                    json!({"user": null, "cluster": true, "admin": true, "key_id": key_id, "from": from})
                }
                Who::User {
                    name,
                    admin,
                    key_id,
                    ..
                } => json!({"user": name, "admin": admin, "key_id": key_id, "cluster": false}),
            },
            vec![],
        ))
    }

    async fn insert_key(&self, c: &impl GenericClient, user_id: i64) -> Result<NewKey, WireError> {
        let k = self.new_key()?;
        exec(
            c,
            "INSERT INTO api_keys (key_id, user_id, curve_public) VALUES ($1, $2, $3)",
            &[&k.key_id, &user_id, &k.curve_public],
        )
        .await?;
        Ok(k)
    }

    fn key_reply(user: &str, admin: bool, k: &NewKey) -> Value {
        json!({
            "user": user,
            "admin": admin,
            "key_id": k.key_id,
            "secret": k.secret,
            "curve": {"client_public": k.curve_public, "client_secret": k.curve_secret},
        })
    }

    pub async fn user_create(&self, who: &Who, v: &Value) -> Result<Reply, WireError> {
        who.require_admin("create users")?;
        let b = Body::of(v)?;
        let name = b.str("name")?;
        names::user(name)?;
        let admin = b.opt_bool("admin")?.unwrap_or(false);
        let mut c = self.conn().await?;
        let tx = c.transaction().await.map_err(pg)?;
        let row = q1(
            &tx,
            "INSERT INTO api_users (name, admin) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING RETURNING id",
            &[&name, &admin],
        )
        .await?
        .ok_or_else(|| conflict(format!("user {name} already exists")))?;
        let k = self.insert_key(&tx, row.get(0)).await?;
        audit(
            &tx,
            who,
            "user.create",
            None,
            json!({"user": name, "admin": admin, "key_id": k.key_id}),
        )
        .await?;
        commit(tx).await?;
        Ok((Self::key_reply(name, admin, &k), vec![]))
    }

    pub async fn user_list(&self, who: &Who) -> Result<Reply, WireError> {
        who.require_admin("list users")?;
        let c = self.conn().await?;
        let rows = q(
            &c,
            &format!(
                "SELECT name, admin, disabled, {MS},
                   (SELECT count(*) FROM api_keys k WHERE k.user_id = u.id AND k.revoked_at IS NULL)
                 FROM api_users u ORDER BY name"
            ),
            &[],
        )
        .await?;
        let users: Vec<Value> = rows
            .iter()
            .map(|r| {
                json!({"name": r.get::<_, String>(0), "admin": r.get::<_, bool>(1),
                       "disabled": r.get::<_, bool>(2), "created_at": r.get::<_, i64>(3),
                       "keys": r.get::<_, i64>(4)})
            })
            .collect();
        Ok((json!({ "users": users }), vec![]))
    }

    pub async fn user_revoke(&self, who: &Who, v: &Value) -> Result<Reply, WireError> {
        who.require_admin("revoke users")?;
        let b = Body::of(v)?;
        let name = b.str("name")?;
        let mut c = self.conn().await?;
        let tx = c.transaction().await.map_err(pg)?;
        let uid = self.user_id(&tx, name).await?;
        exec(
            &tx,
            "UPDATE api_users SET disabled = true WHERE id = $1",
            &[&uid],
        )
        .await?;
        let n = exec(
            &tx,
            "UPDATE api_keys SET revoked_at = now() WHERE user_id = $1 AND revoked_at IS NULL",
            &[&uid],
        )
        .await?;
        audit(
            &tx,
            who,
            "user.revoke",
            None,
            json!({"user": name, "revoked_keys": n}),
        )
        .await?;
        commit(tx).await?;
        Ok((json!({ "revoked_keys": n }), vec![]))
    }

    pub async fn key_create(&self, who: &Who, v: &Value) -> Result<Reply, WireError> {
        let b = Body::of(v)?;
        let target = self.target_user(who, &b, "create keys")?;
        let mut c = self.conn().await?;
        let tx = c.transaction().await.map_err(pg)?;
        let row = q1(
            &tx,
            "SELECT id, admin, disabled FROM api_users WHERE name = $1 FOR SHARE",
            &[&target],
        )
        .await?
        .ok_or_else(|| not_found(format!("user {target} does not exist")))?;
        if row.get::<_, bool>(2) {
            return Err(conflict(format!("user {target} is disabled")));
        }
        let k = self.insert_key(&tx, row.get(0)).await?;
        audit(
            &tx,
            who,
            "key.create",
            None,
            json!({"user": target, "key_id": k.key_id}),
        )
        .await?;
        commit(tx).await?;
        Ok((Self::key_reply(&target, row.get(1), &k), vec![]))
    }

    pub async fn key_rotate(&self, who: &Who) -> Result<Reply, WireError> {
        let Who::User {
            id,
            name,
            admin,
            key_id,
        } = who
        else {
            return Err(WireError::invalid(
                "key.rotate replaces the calling user key; the cluster key is rotated in the cluster file",
            ));
        };
        let mut c = self.conn().await?;
        let tx = c.transaction().await.map_err(pg)?;
        // `resolve` checked the key before this transaction; it may have been
        // revoked (or rotated by a concurrent call) since. So the user row is
        // locked (a `user.revoke` waits, or has disabled it) and the calling key is
        // revoked first: only the one call that revokes it gets a new key.
        let disabled: bool = q1(
            &tx,
            "SELECT disabled FROM api_users WHERE id = $1 FOR SHARE",
            &[id],
        )
        .await?
        .map(|r| r.get(0))
        .unwrap_or(true);
        if disabled {
            return Err(WireError::new(
                Code::UnknownKey,
                format!("user {name} is disabled; ask your operator"),
            ));
        }
        if q1(
            &tx,
            "UPDATE api_keys SET revoked_at = now()
             WHERE key_id = $1 AND user_id = $2 AND revoked_at IS NULL RETURNING 1",
            &[key_id, id],
        )
        .await?
        .is_none()
        {
            return Err(WireError::new(
                Code::UnknownKey,
                format!(
                    "key {key_id} was revoked (or rotated) meanwhile; log in again with new credentials (`paddock login`)"
                ),
            ));
        }
        let k = self.insert_key(&tx, *id).await?;
        audit(
            &tx,
            who,
            "key.rotate",
            None,
            json!({"user": name, "revoked": key_id, "key_id": k.key_id}),
        )
        .await?;
        commit(tx).await?;
        Ok((Self::key_reply(name, *admin, &k), vec![]))
    }

    pub async fn key_list(&self, who: &Who, v: &Value) -> Result<Reply, WireError> {
        let b = Body::of(v)?;
        let target = self.target_user(who, &b, "list the keys")?;
        let c = self.conn().await?;
        let uid = self.user_id(&c, &target).await?;
        let rows = q(
            &c,
            &format!(
                "SELECT key_id, {MS}, (extract(epoch from revoked_at) * 1000)::bigint
                 FROM api_keys WHERE user_id = $1 ORDER BY created_at"
            ),
            &[&uid],
        )
        .await?;
        let keys: Vec<Value> = rows
            .iter()
            .map(|r| {
                let id: String = r.get(0);
                json!({"key_id": id, "created_at": r.get::<_, i64>(1),
                       "revoked_at": r.get::<_, Option<i64>>(2), "current": id == who.key_id()})
            })
            .collect();
        Ok((json!({ "keys": keys }), vec![]))
    }

    pub async fn key_revoke(&self, who: &Who, v: &Value) -> Result<Reply, WireError> {
        let b = Body::of(v)?;
        let key_id = b.str("key_id")?;
        let mut c = self.conn().await?;
        let tx = c.transaction().await.map_err(pg)?;
        // Another user's key is `not_found` like a key that does not exist: a key id
        // does not tell a stranger whose it is.
        let owner: String = q1(
            &tx,
            "SELECT u.name FROM api_keys k JOIN api_users u ON u.id = k.user_id
             WHERE k.key_id = $1 AND k.revoked_at IS NULL FOR UPDATE OF k",
            &[&key_id],
        )
        .await?
        .map(|r| r.get::<_, String>(0))
        .filter(|owner| who.is_admin() || who.user_name() == Some(owner))
        .ok_or_else(|| {
            not_found(format!(
                "no such key: {key_id} is not a live key of yours (`key.list` shows them)"
            ))
        })?;
        exec(
            &tx,
            "UPDATE api_keys SET revoked_at = now() WHERE key_id = $1",
            &[&key_id],
        )
        .await?;
        audit(
            &tx,
            who,
            "key.revoke",
            None,
            json!({"user": owner, "key_id": key_id}),
        )
        .await?;
        commit(tx).await?;
        Ok((json!({}), vec![]))
    }

    pub async fn sshkey_add(&self, who: &Who, v: &Value) -> Result<Reply, WireError> {
        let b = Body::of(v)?;
        let target = self.target_user(who, &b, "add SSH keys")?;
        let key = sshkey::parse(b.str("public_key")?)?;
        let mut c = self.conn().await?;
        let tx = c.transaction().await.map_err(pg)?;
        let uid = self.user_id(&tx, &target).await?;
        let done = q1(
            &tx,
            "INSERT INTO api_ssh_keys (fingerprint, user_id, algorithm, public_key, comment)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (fingerprint) DO NOTHING RETURNING 1",
            &[
                &key.fingerprint,
                &uid,
                &key.algorithm,
                &key.public_key,
                &key.comment,
            ],
        )
        .await?;
        if done.is_none() {
            return Err(conflict(format!(
                "SSH key {} is already added (to this or another user); each key belongs to one user",
                key.fingerprint
            )));
        }
        audit(
            &tx,
            who,
            "sshkey.add",
            None,
            json!({"user": target, "fingerprint": key.fingerprint}),
        )
        .await?;
        commit(tx).await?;
        Ok((
            json!({"fingerprint": key.fingerprint, "algorithm": key.algorithm, "comment": key.comment}),
            vec![],
        ))
    }

    pub async fn sshkey_list(&self, who: &Who, v: &Value) -> Result<Reply, WireError> {
        let b = Body::of(v)?;
        let target = self.target_user(who, &b, "list the SSH keys")?;
        let c = self.conn().await?;
        let uid = self.user_id(&c, &target).await?;
        let rows = q(
            &c,
            &format!("SELECT fingerprint, algorithm, comment, {MS} FROM api_ssh_keys WHERE user_id = $1 ORDER BY created_at"),
            &[&uid],
        )
        .await?;
        let keys: Vec<Value> = rows
            .iter()
            .map(|r| {
                json!({"fingerprint": r.get::<_, String>(0), "algorithm": r.get::<_, String>(1),
                            "comment": r.get::<_, String>(2), "created_at": r.get::<_, i64>(3)})
            })
            .collect();
        Ok((json!({ "keys": keys }), vec![]))
    }

    pub async fn sshkey_remove(&self, who: &Who, v: &Value) -> Result<Reply, WireError> {
        let b = Body::of(v)?;
        let fp = b.str("fingerprint")?;
        let mut c = self.conn().await?;
        let tx = c.transaction().await.map_err(pg)?;
        // Another user's key is `not_found` like one nobody has: a fingerprint does
        // not tell a stranger whose key it is.
        let owner: String = q1(
            &tx,
            "SELECT u.name FROM api_ssh_keys s JOIN api_users u ON u.id = s.user_id
             WHERE s.fingerprint = $1 FOR UPDATE OF s",
            &[&fp],
        )
        .await?
        .map(|r| r.get::<_, String>(0))
        .filter(|owner| who.is_admin() || who.user_name() == Some(owner))
        .ok_or_else(|| {
            not_found(format!(
                "no such SSH key: {fp} is not one of yours (`paddock keys` lists them)"
            ))
        })?;
        exec(
            &tx,
            "DELETE FROM api_ssh_keys WHERE fingerprint = $1",
            &[&fp],
        )
        .await?;
        audit(
            &tx,
            who,
            "sshkey.remove",
            None,
            json!({"user": owner, "fingerprint": fp}),
        )
        .await?;
        commit(tx).await?;
        Ok((json!({}), vec![]))
    }

    pub async fn sshkey_lookup(&self, v: &Value) -> Result<Reply, WireError> {
        let b = Body::of(v)?;
        let fp = b.str("fingerprint")?;
        let c = self.conn().await?;
        let row = q1(
            &c,
            "SELECT u.name, s.public_key FROM api_ssh_keys s JOIN api_users u ON u.id = s.user_id
             WHERE s.fingerprint = $1 AND NOT u.disabled",
            &[&fp],
        )
        .await?
        .ok_or_else(|| not_found(format!("no user has SSH key {fp}")))?;
        Ok((
            json!({"user": row.get::<_, String>(0), "public_key": row.get::<_, String>(1)}),
            vec![],
        ))
    }

    // ---- apps ----------------------------------------------------------------

    pub async fn app_create(&self, who: &Who, v: &Value) -> Result<Reply, WireError> {
        let b = Body::of(v)?;
        let given = b.opt_str("name")?;
        if let Some(n) = given {
            names::app(n)?;
        }
        let owner = match (b.opt_str("owner")?, who) {
            (Some(o), w) if w.is_admin() => o.to_string(),
            (Some(o), Who::User { name, .. }) if o == name => o.to_string(),
            (Some(_), _) => {
                return Err(forbidden(
                    "only an admin may create an app for another user",
                ))
            }
            (None, Who::User { name, .. }) => name.clone(),
            (None, Who::Cluster { .. }) => {
                return Err(WireError::invalid(
                    "`owner` is required when the cluster key creates an app",
                ))
            }
        };
        let mut c = self.conn().await?;
        // A random name may collide: try a few.
        for attempt in 0..8 {
            let name = match given {
                Some(n) => n.to_string(),
                None => names::random_app_name(),
            };
            let tx = c.transaction().await.map_err(pg)?;
            let uid = self.user_id(&tx, &owner).await?;
            let Some(row) = q1(
                &tx,
                "INSERT INTO api_apps (name, owner_id, next_release, current_release) VALUES ($1, $2, 2, 1)
                 ON CONFLICT (name) DO NOTHING RETURNING id",
                &[&name, &uid],
            )
            .await?
            else {
                drop(tx);
                if given.is_some() || attempt == 7 {
                    return Err(conflict(format!("app name {name} is taken; choose another")));
                }
                continue;
            };
            let id: i64 = row.get(0);
            exec(
                &tx,
                "INSERT INTO api_access (app_id, user_id, role) VALUES ($1, $2, 'owner')",
                &[&id, &uid],
            )
            .await?;
            exec(
                &tx,
                "INSERT INTO api_releases (app_id, version, description, created_by, status)
                 VALUES ($1, 1, 'Initial release', $2, 'succeeded')",
                &[&id, &who.actor()],
            )
            .await?;
            let mut domains = vec![];
            if let Some(d) = &self.apps_domain {
                let dom = format!("{name}.{d}");
                let ok = q1(
                    &tx,
                    "INSERT INTO api_domains (domain, app_id, is_default) VALUES ($1, $2, true)
                     ON CONFLICT (domain) DO NOTHING RETURNING 1",
                    &[&dom, &id],
                )
                .await?;
                if ok.is_none() {
                    return Err(conflict(format!(
                        "the default domain {dom} already belongs to another app; choose another name"
                    )));
                }
                domains.push(dom);
            }
            let row = AppRow {
                id,
                name: name.clone(),
                role: Some(Role::Owner),
            };
            audit(&tx, who, "app.create", Some(&row), json!({"owner": owner})).await?;
            commit(tx).await?;
            let app = json!({"name": name, "owner": owner, "role": "owner", "domains": domains,
                             "current_release": 1, "latest_release": 1});
            return Ok((json!({ "app": app }), changed(&name, "created")));
        }
        unreachable!("the loop returns")
    }

    pub async fn app_list(&self, who: &Who, v: &Value) -> Result<Reply, WireError> {
        let b = Body::of(v)?;
        let all = b.opt_bool("all")?.unwrap_or(false);
        if all {
            who.require_admin("list every app")?;
        }
        let c = self.conn().await?;
        let uid = who.user_id().unwrap_or(-1);
        let every = all || who.user_id().is_none();
        let rows = q(
            &c,
            "SELECT a.name, u.name, (SELECT role FROM api_access WHERE app_id = a.id AND user_id = $1),
               a.current_release, a.next_release - 1, (extract(epoch from a.created_at) * 1000)::bigint
             FROM api_apps a JOIN api_users u ON u.id = a.owner_id
             WHERE $2 OR EXISTS (SELECT 1 FROM api_access x WHERE x.app_id = a.id AND x.user_id = $1)
             ORDER BY a.name",
            &[&uid, &every],
        )
        .await?;
        let apps: Vec<Value> = rows
            .iter()
            .map(|r| json!({"name": r.get::<_, String>(0), "owner": r.get::<_, String>(1),
                            "role": r.get::<_, Option<String>>(2), "current_release": r.get::<_, Option<i32>>(3),
                            "latest_release": r.get::<_, i32>(4), "created_at": r.get::<_, i64>(5)}))
            .collect();
        Ok((json!({ "apps": apps }), vec![]))
    }

    pub async fn app_info(&self, who: &Who, v: &Value) -> Result<Reply, WireError> {
        let b = Body::of(v)?;
        let c = self.conn().await?;
        let app = self
            .app_for(&c, who, b.str("app")?, Need::Access, "see it", false)
            .await?;
        let row = q1(
            &c,
            "SELECT u.name, a.current_release, a.next_release - 1, (extract(epoch from a.created_at) * 1000)::bigint
             FROM api_apps a JOIN api_users u ON u.id = a.owner_id WHERE a.id = $1",
            &[&app.id],
        )
        .await?
        .ok_or_else(|| not_found(format!("app {} does not exist", app.name)))?;
        let domains = self.domains_of(&c, app.id).await?;
        let formation = self.formation_of(&c, app.id).await?;
        let access = self.access_of(&c, app.id).await?;
        let info = json!({
            "name": app.name,
            "owner": row.get::<_, String>(0),
            "role": app.role.map(|r| if r == Role::Owner { "owner" } else { "collaborator" }),
            "current_release": row.get::<_, Option<i32>>(1),
            "latest_release": row.get::<_, i32>(2),
            "created_at": row.get::<_, i64>(3),
            "domains": domains.iter().map(|d| d["domain"].clone()).collect::<Vec<_>>(),
            "formation": formation,
            "collaborators": access,
        });
        Ok((json!({ "app": info }), vec![]))
    }

    /// Deletes every row of the app (the caller cleans up other daemons after).
    pub async fn app_destroy(
        &self,
        who: &Who,
        v: &Value,
    ) -> Result<(String, Vec<String>), WireError> {
        let b = Body::of(v)?;
        let name = b.str("app")?;
        let confirm = b.opt_str("confirm")?.unwrap_or("");
        let mut c = self.conn().await?;
        let tx = c.transaction().await.map_err(pg)?;
        let app = self
            .app_for(&tx, who, name, Need::Owner, "destroy it", true)
            .await?;
        if confirm != app.name {
            return Err(WireError::invalid(format!(
                "destroying app {name} removes everything it has; repeat its name to confirm (--confirm {name})"
            )));
        }
        let domains: Vec<String> = q(
            &tx,
            "SELECT domain FROM api_domains WHERE app_id = $1",
            &[&app.id],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
        exec(&tx, "DELETE FROM api_apps WHERE id = $1", &[&app.id]).await?;
        audit(
            &tx,
            who,
            "app.destroy",
            Some(&app),
            json!({"domains": domains}),
        )
        .await?;
        commit(tx).await?;
        Ok((app.name, domains))
    }

    async fn access_of(&self, c: &impl GenericClient, app: i64) -> Result<Vec<Value>, WireError> {
        Ok(q(
            c,
            "SELECT u.name, x.role FROM api_access x JOIN api_users u ON u.id = x.user_id
             WHERE x.app_id = $1 ORDER BY x.role DESC, u.name",
            &[&app],
        )
        .await?
        .iter()
        .map(|r| json!({"user": r.get::<_, String>(0), "role": r.get::<_, String>(1)}))
        .collect())
    }

    pub async fn access_list(&self, who: &Who, v: &Value) -> Result<Reply, WireError> {
        let b = Body::of(v)?;
        let (c, app) = self.readable(who, &b, "see who has access").await?;
        Ok((
            json!({ "access": self.access_of(&c, app.id).await? }),
            vec![],
        ))
    }

    pub async fn access_add(&self, who: &Who, v: &Value) -> Result<Reply, WireError> {
        let b = Body::of(v)?;
        let user = b.str("user")?;
        let role = b.opt_str("role")?.unwrap_or("collaborator");
        if role != "collaborator" {
            return Err(WireError::invalid(format!(
                "role {role:?} cannot be given: an app has one owner; add `collaborator`s"
            )));
        }
        let mut c = self.conn().await?;
        let tx = c.transaction().await.map_err(pg)?;
        let app = self
            .app_for(
                &tx,
                who,
                b.str("app")?,
                Need::Owner,
                "add collaborators",
                true,
            )
            .await?;
        let uid = self.user_id(&tx, user).await?;
        let done = q1(
            &tx,
            "INSERT INTO api_access (app_id, user_id, role) VALUES ($1, $2, 'collaborator')
             ON CONFLICT DO NOTHING RETURNING 1",
            &[&app.id, &uid],
        )
        .await?;
        if done.is_none() {
            return Err(conflict(format!(
                "{user} already has access to {}",
                app.name
            )));
        }
        audit(
            &tx,
            who,
            "access.add",
            Some(&app),
            json!({"user": user, "role": role}),
        )
        .await?;
        commit(tx).await?;
        Ok((json!({}), changed(&app.name, "access")))
    }

    pub async fn access_remove(&self, who: &Who, v: &Value) -> Result<Reply, WireError> {
        let b = Body::of(v)?;
        let user = b.str("user")?;
        let mut c = self.conn().await?;
        let tx = c.transaction().await.map_err(pg)?;
        let app = self
            .app_for(
                &tx,
                who,
                b.str("app")?,
                Need::Owner,
                "remove collaborators",
                true,
            )
            .await?;
        let uid = self.user_id(&tx, user).await?;
        let role: Option<String> = q1(
            &tx,
            "SELECT role FROM api_access WHERE app_id = $1 AND user_id = $2",
            &[&app.id, &uid],
        )
        .await?
        .map(|r| r.get(0));
        match role.as_deref() {
            None => return Err(not_found(format!("{user} has no access to {}", app.name))),
            Some("owner") => {
                return Err(WireError::invalid(format!(
                    "{user} owns {}; the owner cannot be removed",
                    app.name
                )))
            }
            _ => {}
        }
        exec(
            &tx,
            "DELETE FROM api_access WHERE app_id = $1 AND user_id = $2",
            &[&app.id, &uid],
        )
        .await?;
        audit(&tx, who, "access.remove", Some(&app), json!({"user": user})).await?;
        commit(tx).await?;
        Ok((json!({}), changed(&app.name, "access")))
    }

    // ---- config and releases -------------------------------------------------

    pub async fn config_get(&self, who: &Who, v: &Value) -> Result<Reply, WireError> {
        let b = Body::of(v)?;
        let (c, app) = self.readable(who, &b, "read its config").await?;
        let config: Value = q1(&c, "SELECT config FROM api_apps WHERE id = $1", &[&app.id])
            .await?
            .map(|r| r.get(0))
            .unwrap_or_else(|| json!({}));
        match b.opt_str("name")? {
            None => Ok((json!({ "config": config }), vec![])),
            Some(n) => match config.get(n) {
                Some(val) => Ok((json!({"name": n, "value": val}), vec![])),
                None => Err(not_found(format!(
                    "config var {n} is not set on {}",
                    app.name
                ))),
            },
        }
    }

    /// Makes a new release from the locked app's latest one with `edit` applied, and
    /// its audit row; `kind`/`detail` describe the change.
    #[allow(clippy::too_many_arguments)]
    async fn new_release(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        who: &Who,
        app: &AppRow,
        config: &BTreeMap<String, String>,
        base: Option<i32>,
        description: &str,
        kind: &str,
        detail: Value,
    ) -> Result<Value, WireError> {
        let config_json = Value::Object(
            config
                .iter()
                .map(|(k, v)| (k.clone(), json!(v)))
                .collect::<Map<_, _>>(),
        );
        // The slug, process types and health checks carry over from `base` (a
        // rollback's target) or else from the newest release that did not fail: a
        // deploy under way (its code goes out with the new config), else the
        // current one. Never a failed build, which a config change must not roll
        // out again.
        let from = match base {
            Some(v) => v,
            None => q1(
                tx,
                "SELECT max(version) FROM api_releases WHERE app_id = $1 AND status <> 'failed'",
                &[&app.id],
            )
            .await?
            .and_then(|r| r.get::<_, Option<i32>>(0))
            .unwrap_or(0),
        };
        let row = q1(
            tx,
            "WITH n AS (UPDATE api_apps SET next_release = next_release + 1, config = $2
                        WHERE id = $1 RETURNING next_release - 1 AS v),
                  prev AS (SELECT slug, process_types, healthchecks, scheduling FROM api_releases WHERE app_id = $1 AND version = $3)
             INSERT INTO api_releases (app_id, version, slug, process_types, config, healthchecks, scheduling, description, created_by, status)
             SELECT $1, n.v, prev.slug, COALESCE(prev.process_types, '{}'), $2, COALESCE(prev.healthchecks, '{}'),
                    COALESCE(prev.scheduling, '{}'), $4, $5,
                    CASE WHEN prev.slug IS NULL THEN 'succeeded' ELSE 'pending' END
             FROM n LEFT JOIN prev ON true
             RETURNING version, slug IS NULL",
            &[&app.id, &config_json, &from, &description, &who.actor()],
        )
        .await?
        .ok_or_else(|| WireError::internal("release insert returned nothing"))?;
        let version: i32 = row.get(0);
        if row.get::<_, bool>(1) {
            // Nothing to roll out: it is the current release at once.
            exec(
                tx,
                "UPDATE api_apps SET current_release = $2 WHERE id = $1",
                &[&app.id, &version],
            )
            .await?;
        }
        let mut detail = detail;
        detail["version"] = json!(version);
        audit(tx, who, kind, Some(app), detail).await?;
        self.release(tx, app.id, version, false).await
    }

    async fn release(
        &self,
        c: &impl GenericClient,
        app: i64,
        version: i32,
        with_config: bool,
    ) -> Result<Value, WireError> {
        let row = q1(
            c,
            &format!("SELECT {RELEASE_COLS} FROM api_releases r JOIN api_apps a ON a.id = r.app_id WHERE r.app_id = $1 AND r.version = $2"),
            &[&app, &version],
        )
        .await?
        .ok_or_else(|| not_found(format!("release v{version} does not exist (`paddock releases` lists them)")))?;
        Ok(release_json(&row, with_config))
    }

    async fn locked_config(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        app: i64,
    ) -> Result<BTreeMap<String, String>, WireError> {
        let config: Value = q1(tx, "SELECT config FROM api_apps WHERE id = $1", &[&app])
            .await?
            .map(|r| r.get(0))
            .unwrap_or_else(|| json!({}));
        Ok(config
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                    .collect()
            })
            .unwrap_or_default())
    }

    pub async fn config_set(&self, who: &Who, v: &Value) -> Result<Reply, WireError> {
        let b = Body::of(v)?;
        let vars = b
            .opt("vars")
            .and_then(Value::as_object)
            .ok_or_else(|| WireError::invalid("`vars` must be an object of NAME: \"value\""))?;
        if vars.is_empty() {
            return Err(WireError::invalid(
                "`vars` is empty: set at least one NAME=value",
            ));
        }
        let mut set = BTreeMap::new();
        for (k, val) in vars {
            names::config_name(k)?;
            let s = val
                .as_str()
                .ok_or_else(|| WireError::invalid(format!("config var {k} must be a string")))?;
            set.insert(k.clone(), s.to_string());
        }
        names::config_sizes(&set)?;
        let mut c = self.conn().await?;
        let tx = c.transaction().await.map_err(pg)?;
        let app = self
            .app_for(
                &tx,
                who,
                b.str("app")?,
                Need::Access,
                "change its config",
                true,
            )
            .await?;
        let mut config = self.locked_config(&tx, app.id).await?;
        let names: Vec<&String> = set.keys().collect();
        let description = format!(
            "Set {}",
            names
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        let detail = json!({ "set": names });
        config.extend(set.clone());
        names::config_sizes(&config)?;
        let release = self
            .new_release(
                &tx,
                who,
                &app,
                &config,
                None,
                &description,
                "config.set",
                detail,
            )
            .await?;
        commit(tx).await?;
        Ok((json!({ "release": release }), changed(&app.name, "config")))
    }

    pub async fn config_unset(&self, who: &Who, v: &Value) -> Result<Reply, WireError> {
        let b = Body::of(v)?;
        let names: Vec<String> = b
            .opt("names")
            .and_then(Value::as_array)
            .ok_or_else(|| WireError::invalid("`names` must be a list of config var names"))?
            .iter()
            .map(|n| {
                n.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| WireError::invalid("`names` must hold strings"))
            })
            .collect::<Result<_, _>>()?;
        if names.is_empty() {
            return Err(WireError::invalid(
                "`names` is empty: name at least one var to unset",
            ));
        }
        let mut c = self.conn().await?;
        let tx = c.transaction().await.map_err(pg)?;
        let app = self
            .app_for(
                &tx,
                who,
                b.str("app")?,
                Need::Access,
                "change its config",
                true,
            )
            .await?;
        let mut config = self.locked_config(&tx, app.id).await?;
        let missing: Vec<&String> = names.iter().filter(|n| !config.contains_key(*n)).collect();
        if !missing.is_empty() {
            return Err(not_found(format!(
                "{} not set on {}; nothing was changed",
                missing
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                app.name
            )));
        }
        for n in &names {
            config.remove(n);
        }
        let description = format!("Unset {}", names.join(", "));
        let release = self
            .new_release(
                &tx,
                who,
                &app,
                &config,
                None,
                &description,
                "config.unset",
                json!({ "unset": names }),
            )
            .await?;
        commit(tx).await?;
        Ok((json!({ "release": release }), changed(&app.name, "config")))
    }

    pub async fn release_list(&self, who: &Who, v: &Value) -> Result<Reply, WireError> {
        let b = Body::of(v)?;
        let n = limit(&b, 15, 1000)?;
        let (c, app) = self.readable(who, &b, "list its releases").await?;
        let rows = q(
            &c,
            &format!(
                "SELECT {RELEASE_LIST_COLS} FROM api_releases r JOIN api_apps a ON a.id = r.app_id
                      WHERE r.app_id = $1 ORDER BY r.version DESC LIMIT $2"
            ),
            &[&app.id, &n],
        )
        .await?;
        let releases: Vec<Value> = rows.iter().map(|r| release_json(r, false)).collect();
        Ok((json!({ "releases": releases }), vec![]))
    }

    pub async fn release_info(&self, who: &Who, v: &Value) -> Result<Reply, WireError> {
        let b = Body::of(v)?;
        let version = b
            .version("version")?
            .ok_or_else(|| WireError::invalid("`version` is required"))?;
        let (c, app) = self.readable(who, &b, "see its releases").await?;
        Ok((
            json!({ "release": self.release(&c, app.id, version, true).await? }),
            vec![],
        ))
    }

    pub async fn rollback(&self, who: &Who, v: &Value) -> Result<Reply, WireError> {
        let b = Body::of(v)?;
        let wanted = b.version("version")?;
        let mut c = self.conn().await?;
        let tx = c.transaction().await.map_err(pg)?;
        let app = self
            .app_for(&tx, who, b.str("app")?, Need::Access, "roll it back", true)
            .await?;
        let target = match wanted {
            Some(v) => v,
            None => q1(
                &tx,
                "SELECT max(r.version) FROM api_releases r JOIN api_apps a ON a.id = r.app_id
                 WHERE r.app_id = $1 AND r.version < a.current_release AND r.status = 'succeeded'",
                &[&app.id],
            )
            .await?
            .and_then(|r| r.get::<_, Option<i32>>(0))
            .ok_or_else(|| {
                not_found(format!(
                    "{} has no release before its current one to roll back to",
                    app.name
                ))
            })?,
        };
        let row = q1(
            &tx,
            "SELECT config, status FROM api_releases WHERE app_id = $1 AND version = $2",
            &[&app.id, &target],
        )
        .await?
        .ok_or_else(|| {
            not_found(format!(
                "release v{target} of {} does not exist (`paddock releases` lists them)",
                app.name
            ))
        })?;
        // Only to a release that succeeded: a failed one would be rolled out again,
        // a pending one is not finished.
        match row.get::<_, &str>(1) {
            "succeeded" => {}
            "failed" => {
                return Err(conflict(format!(
                    "release v{target} of {} failed; roll back to one that succeeded (`paddock releases` lists them)",
                    app.name
                )))
            }
            other => {
                return Err(conflict(format!(
                    "release v{target} of {} is not finished ({other}); roll back to one that succeeded",
                    app.name
                )))
            }
        }
        let config: Value = row.get(0);
        let config: BTreeMap<String, String> = config
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                    .collect()
            })
            .unwrap_or_default();
        let release = self
            .new_release(
                &tx,
                who,
                &app,
                &config,
                Some(target),
                &format!("Rollback to v{target}"),
                "rollback",
                json!({ "to": target }),
            )
            .await?;
        commit(tx).await?;
        Ok((json!({ "release": release }), changed(&app.name, "release")))
    }

    pub async fn release_create(&self, who: &Who, v: &Value) -> Result<Reply, WireError> {
        let b = Body::of(v)?;
        // One form everywhere (the blobstore's name, what GC keeps, what runners
        // fetch): 64 lowercase hex digits; `sha256:<hex>` is read as the same.
        let slug = crate::names::blob_sha256("slug", b.str("slug")?)?;
        let types = b
            .opt("process_types")
            .and_then(Value::as_object)
            .ok_or_else(|| {
                WireError::invalid("`process_types` must be an object of type: command")
            })?;
        for (t, cmd) in types {
            names::process_type(t)?;
            if cmd.as_str().is_none_or(|s| s.trim().is_empty()) {
                return Err(WireError::invalid(format!(
                    "process type {t} needs a command"
                )));
            }
        }
        let healthchecks = b.opt("healthchecks").cloned().unwrap_or_else(|| json!({}));
        check_healthchecks(&healthchecks, types)?;
        let scheduling = b.opt("scheduling").cloned().unwrap_or_else(|| json!({}));
        check_scheduling(&scheduling, types)?;
        let description = b.opt_str("description")?.unwrap_or("Deploy");
        let created_by = b
            .opt_str("created_by")?
            .map(str::to_string)
            .unwrap_or_else(|| who.actor());
        let mut c = self.conn().await?;
        let tx = c.transaction().await.map_err(pg)?;
        let app = self
            .app_for(&tx, who, b.str("app")?, Need::Access, "release it", true)
            .await?;
        let row = q1(
            &tx,
            "WITH n AS (UPDATE api_apps SET next_release = next_release + 1 WHERE id = $1
                        RETURNING next_release - 1 AS v, config)
             INSERT INTO api_releases (app_id, version, slug, process_types, config, healthchecks, scheduling, description, created_by, status)
             SELECT $1, n.v, $2, $3, n.config, $4, $7, $5, $6, 'pending' FROM n RETURNING version",
            &[&app.id, &slug, &Value::Object(types.clone()), &healthchecks, &description, &created_by, &scheduling],
        )
        .await?
        .ok_or_else(|| WireError::internal("release insert returned nothing"))?;
        let version: i32 = row.get(0);
        // New process types join the formation: web at 1 (as on Heroku), others at 0.
        for t in types.keys() {
            let qty: i32 = if t == "web" { 1 } else { 0 };
            exec(
                &tx,
                "INSERT INTO api_formation (app_id, process_type, quantity, memory_mb, pids)
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                &[&app.id, t, &qty, &DEFAULT_MEMORY_MB, &DEFAULT_PIDS],
            )
            .await?;
        }
        audit(
            &tx,
            who,
            "release.create",
            Some(&app),
            json!({"version": version, "slug": slug, "by": created_by}),
        )
        .await?;
        let release = self.release(&tx, app.id, version, false).await?;
        commit(tx).await?;
        Ok((json!({ "release": release }), changed(&app.name, "release")))
    }

    pub async fn release_status(&self, who: &Who, v: &Value) -> Result<Reply, WireError> {
        let b = Body::of(v)?;
        let version = b
            .version("version")?
            .ok_or_else(|| WireError::invalid("`version` is required"))?;
        let status = b.str("status")?;
        if status != "succeeded" && status != "failed" {
            return Err(WireError::invalid(
                "`status` must be \"succeeded\" or \"failed\"",
            ));
        }
        let message = b.opt_str("message")?.unwrap_or("");
        let mut c = self.conn().await?;
        let tx = c.transaction().await.map_err(pg)?;
        let app = self
            .app_for(
                &tx,
                who,
                b.str("app")?,
                Need::Access,
                "set a release's status",
                true,
            )
            .await?;
        let now: String = q1(
            &tx,
            "SELECT status FROM api_releases WHERE app_id = $1 AND version = $2",
            &[&app.id, &version],
        )
        .await?
        .map(|r| r.get(0))
        .ok_or_else(|| not_found(format!("release v{version} of {} does not exist", app.name)))?;
        if now != "pending" {
            return Err(conflict(format!(
                "release v{version} of {} is already {now}",
                app.name
            )));
        }
        exec(
            &tx,
            "UPDATE api_releases SET status = $3, status_message = $4 WHERE app_id = $1 AND version = $2",
            &[&app.id, &version, &status, &message],
        )
        .await?;
        if status == "succeeded" {
            exec(
                &tx,
                "UPDATE api_apps SET current_release = $2 WHERE id = $1 AND (current_release IS NULL OR current_release < $2)",
                &[&app.id, &version],
            )
            .await?;
        }
        audit(
            &tx,
            who,
            "release.status",
            Some(&app),
            json!({"version": version, "status": status}),
        )
        .await?;
        let release = self.release(&tx, app.id, version, false).await?;
        commit(tx).await?;
        Ok((json!({ "release": release }), changed(&app.name, "release")))
    }

    // ---- formation -------------------------------------------------------------

    async fn formation_of(
        &self,
        c: &impl GenericClient,
        app: i64,
    ) -> Result<Vec<Value>, WireError> {
        let rows = q(
            c,
            "SELECT f.process_type, f.quantity, f.memory_mb, f.pids,
                    (SELECT r.process_types ->> f.process_type FROM api_releases r
                     WHERE r.app_id = f.app_id ORDER BY r.version DESC LIMIT 1)
             FROM api_formation f WHERE f.app_id = $1 ORDER BY f.process_type",
            &[&app],
        )
        .await?;
        Ok(rows
            .iter()
            .map(|r| {
                json!({"type": r.get::<_, String>(0), "quantity": r.get::<_, i32>(1),
                            "memory_mb": r.get::<_, i32>(2), "pids": r.get::<_, i32>(3),
                            "command": r.get::<_, Option<String>>(4)})
            })
            .collect())
    }

    pub async fn formation_get(&self, who: &Who, v: &Value) -> Result<Reply, WireError> {
        let b = Body::of(v)?;
        let (c, app) = self.readable(who, &b, "see its formation").await?;
        Ok((
            json!({ "formation": self.formation_of(&c, app.id).await? }),
            vec![],
        ))
    }

    /// `formation.scale`. `place` is asked, before the change commits, whether the
    /// whole new formation can be placed (the scheduler's `formation.check`): an
    /// error from it refuses the change, which is then rolled back whole; what it
    /// returns goes into the reply as `placement`.
    pub async fn formation_scale<F, Fut>(
        &self,
        who: &Who,
        v: &Value,
        place: F,
    ) -> Result<Reply, WireError>
    where
        F: FnOnce(String, Vec<Value>) -> Fut,
        Fut: std::future::Future<Output = Result<Value, WireError>>,
    {
        let b = Body::of(v)?;
        let changes = b
            .opt("changes")
            .and_then(Value::as_array)
            .filter(|a| !a.is_empty())
            .ok_or_else(|| {
                WireError::invalid("`changes` must be a non-empty list of {\"type\", \"quantity\"}")
            })?;
        if changes.len() > MAX_SCALE_CHANGES {
            return Err(WireError::invalid(format!(
                "`changes` has {} entries; at most {MAX_SCALE_CHANGES}, one per process type",
                changes.len()
            )));
        }
        let mut c = self.conn().await?;
        let tx = c.transaction().await.map_err(pg)?;
        let app = self
            .app_for(&tx, who, b.str("app")?, Need::Access, "scale it", true)
            .await?;
        // The process types of the newest release that did not fail (as a config
        // change builds on): a failed build's types never run.
        let types: Value = q1(
            &tx,
            "SELECT process_types FROM api_releases WHERE app_id = $1 AND status <> 'failed'
             ORDER BY version DESC LIMIT 1",
            &[&app.id],
        )
        .await?
        .map(|r| r.get(0))
        .unwrap_or_else(|| json!({}));
        let types = types.as_object().cloned().unwrap_or_default();
        let mut detail = vec![];
        let mut seen = std::collections::BTreeSet::new();
        for ch in changes {
            let cb = Body::of(ch)?;
            let t = cb.str("type")?;
            if !seen.insert(t) {
                return Err(WireError::invalid(format!(
                    "process type {t:?} is given twice in `changes`; give each type once"
                )));
            }
            if !types.contains_key(t) {
                let known: Vec<&String> = types.keys().collect();
                return Err(WireError::invalid(if known.is_empty() {
                    format!("{} has no process types yet: push a build first", app.name)
                } else {
                    format!(
                        "{} has no process type {t:?}; its types are {}",
                        app.name,
                        known
                            .iter()
                            .map(|s| s.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                }));
            }
            let range = |field: &str, lo: i64, hi: i64| -> Result<Option<i32>, WireError> {
                match cb.opt_i64(field)? {
                    None => Ok(None),
                    Some(n) if (lo..=hi).contains(&n) => Ok(Some(n as i32)),
                    Some(n) => Err(WireError::invalid(format!(
                        "{t}: `{field}` must be {lo}-{hi}, not {n}"
                    ))),
                }
            };
            let qty = range("quantity", 0, 100)?;
            let mem = range("memory_mb", 64, 65536)?;
            let pids = range("pids", 16, 32768)?;
            if qty.is_none() && mem.is_none() && pids.is_none() {
                return Err(WireError::invalid(format!(
                    "{t}: give a quantity, memory_mb or pids"
                )));
            }
            exec(
                &tx,
                "INSERT INTO api_formation (app_id, process_type, quantity, memory_mb, pids)
                 VALUES ($1, $2, COALESCE($3::integer, 0), COALESCE($4::integer, $6::integer),
                         COALESCE($5::integer, $7::integer))
                 ON CONFLICT (app_id, process_type) DO UPDATE SET
                   quantity = COALESCE($3::integer, api_formation.quantity),
                   memory_mb = COALESCE($4::integer, api_formation.memory_mb),
                   pids = COALESCE($5::integer, api_formation.pids)",
                &[
                    &app.id,
                    &t,
                    &qty,
                    &mem,
                    &pids,
                    &DEFAULT_MEMORY_MB,
                    &DEFAULT_PIDS,
                ],
            )
            .await?;
            detail.push(json!({"type": t, "quantity": qty, "memory_mb": mem, "pids": pids}));
        }
        audit(
            &tx,
            who,
            "formation.scale",
            Some(&app),
            json!({ "changes": detail }),
        )
        .await?;
        let formation = self.formation_of(&tx, app.id).await?;
        // Asked while the app's row is locked, so no other scale slips in between
        // the check and the commit; a refusal drops the transaction (nothing
        // changes, no audit row).
        let placement = place(app.name.clone(), formation.clone()).await?;
        commit(tx).await?;
        Ok((
            json!({ "formation": formation, "placement": placement }),
            changed(&app.name, "formation"),
        ))
    }

    // ---- domains ---------------------------------------------------------------

    async fn domains_of(&self, c: &impl GenericClient, app: i64) -> Result<Vec<Value>, WireError> {
        Ok(q(c, "SELECT domain, is_default FROM api_domains WHERE app_id = $1 ORDER BY is_default DESC, domain", &[&app])
            .await?
            .iter()
            .map(|r| json!({"domain": r.get::<_, String>(0), "default": r.get::<_, bool>(1)}))
            .collect())
    }

    pub async fn domain_list(&self, who: &Who, v: &Value) -> Result<Reply, WireError> {
        let b = Body::of(v)?;
        let (c, app) = self.readable(who, &b, "list its domains").await?;
        Ok((
            json!({ "domains": self.domains_of(&c, app.id).await? }),
            vec![],
        ))
    }

    pub async fn domain_add(&self, who: &Who, v: &Value) -> Result<Reply, WireError> {
        let b = Body::of(v)?;
        let d = names::canonical_domain(b.str("domain")?);
        names::domain(&d, who.is_admin())?;
        if let Some(ad) = &self.apps_domain {
            if !who.is_admin() && (d == *ad || d.ends_with(&format!(".{ad}"))) {
                return Err(WireError::invalid(format!(
                    "{d} is under {ad}, the platform's domain for apps: each app has <app>.{ad} already; add a domain of your own"
                )));
            }
        }
        let mut c = self.conn().await?;
        let tx = c.transaction().await.map_err(pg)?;
        let app = self
            .app_for(&tx, who, b.str("app")?, Need::Access, "add domains", true)
            .await?;
        // A name under another app's wildcard (`x.shop.example` when another app has
        // `*.shop.example`, which only an admin could add) would take traffic that
        // app was given: only an admin may carve it out. The other app is not named.
        if !who.is_admin() {
            let covering: Vec<String> = d
                .match_indices('.')
                .map(|(i, _)| format!("*{}", &d[i..]))
                .collect();
            let wild: Option<String> = q1(
                &tx,
                "SELECT domain FROM api_domains WHERE domain = ANY($1) AND app_id <> $2
                 ORDER BY length(domain) DESC LIMIT 1",
                &[&covering, &app.id],
            )
            .await?
            .map(|r| r.get(0));
            if let Some(w) = wild {
                return Err(conflict(format!(
                    "{d} is covered by the wildcard domain {w} of another app; only an admin may add it"
                )));
            }
        }
        let done = q1(
            &tx,
            "INSERT INTO api_domains (domain, app_id) VALUES ($1, $2) ON CONFLICT DO NOTHING RETURNING 1",
            &[&d, &app.id],
        )
        .await?;
        if done.is_none() {
            let other: Option<String> = q1(
                &tx,
                "SELECT a.name FROM api_domains d JOIN api_apps a ON a.id = d.app_id WHERE d.domain = $1",
                &[&d],
            )
            .await?
            .map(|r| r.get(0));
            return Err(conflict(match other {
                Some(o) if o == app.name => format!("{d} is already a domain of {o}"),
                Some(o) if who.is_admin() => format!("{d} already belongs to app {o}"),
                _ => format!("{d} already belongs to another app"),
            }));
        }
        audit(&tx, who, "domain.add", Some(&app), json!({ "domain": d })).await?;
        commit(tx).await?;
        Ok((json!({ "domain": d }), changed(&app.name, "domains")))
    }

    pub async fn domain_remove(&self, who: &Who, v: &Value) -> Result<Reply, WireError> {
        let b = Body::of(v)?;
        let d = names::canonical_domain(b.str("domain")?);
        let mut c = self.conn().await?;
        let tx = c.transaction().await.map_err(pg)?;
        let app = self
            .app_for(
                &tx,
                who,
                b.str("app")?,
                Need::Access,
                "remove domains",
                true,
            )
            .await?;
        let row = q1(
            &tx,
            "SELECT is_default FROM api_domains WHERE domain = $1 AND app_id = $2",
            &[&d, &app.id],
        )
        .await?
        .ok_or_else(|| not_found(format!("{d} is not a domain of {}", app.name)))?;
        if row.get::<_, bool>(0) {
            return Err(WireError::invalid(format!(
                "{d} is {}'s default domain and stays with it",
                app.name
            )));
        }
        exec(
            &tx,
            "DELETE FROM api_domains WHERE domain = $1 AND app_id = $2",
            &[&d, &app.id],
        )
        .await?;
        audit(
            &tx,
            who,
            "domain.remove",
            Some(&app),
            json!({ "domain": d }),
        )
        .await?;
        commit(tx).await?;
        Ok((json!({}), changed(&app.name, "domains")))
    }

    // ---- audit -----------------------------------------------------------------

    pub async fn audit_list(&self, who: &Who, v: &Value) -> Result<Reply, WireError> {
        let b = Body::of(v)?;
        let n = limit(&b, 15, 1000)?;
        let before = b.opt_i64("before")?.unwrap_or(i64::MAX);
        let c = self.conn().await?;
        // An app's log is that app's, by id: not a destroyed app's of the same name.
        let app = match b.opt_str("app")? {
            Some(a) => Some(
                self.app_for(&c, who, a, Need::Access, "read its audit log", false)
                    .await?
                    .id,
            ),
            None => None,
        };
        let actor = b.opt_str("user")?.map(|u| format!("user:{u}"));
        if app.is_none() && !who.is_admin() {
            // A user without an app reads only their own entries.
            let me = format!("user:{}", who.user_name().unwrap_or_default());
            if actor.as_deref().is_some_and(|a| a != me) {
                return Err(forbidden("only an admin may read another user's audit entries outside an app you can access"));
            }
            return self.audit_rows(&c, None, Some(me), before, n).await;
        }
        self.audit_rows(&c, app, actor, before, n).await
    }

    async fn audit_rows(
        &self,
        c: &impl GenericClient,
        app: Option<i64>,
        actor: Option<String>,
        before: i64,
        n: i64,
    ) -> Result<Reply, WireError> {
        let rows = q(
            c,
            "SELECT id, (extract(epoch from at) * 1000)::bigint, actor, key_id, kind, app, detail FROM api_audit
             WHERE ($1::bigint IS NULL OR app_id = $1) AND ($2::text IS NULL OR actor = $2) AND id < $3
             ORDER BY id DESC LIMIT $4",
            &[&app, &actor, &before, &n],
        )
        .await?;
        let entries: Vec<Value> = rows
            .iter()
            .map(|r| json!({"id": r.get::<_, i64>(0), "at": r.get::<_, i64>(1), "actor": r.get::<_, String>(2),
                            "key_id": r.get::<_, String>(3), "kind": r.get::<_, String>(4),
                            "app": r.get::<_, Option<String>>(5), "detail": r.get::<_, Value>(6)}))
            .collect();
        Ok((json!({ "entries": entries }), vec![]))
    }

    pub async fn audit_append(&self, who: &Who, v: &Value) -> Result<Reply, WireError> {
        let b = Body::of(v)?;
        let actor = b.str("actor")?;
        let kind = b.str("kind")?;
        if actor.is_empty() || actor.len() > 200 || kind.is_empty() || kind.len() > 100 {
            return Err(WireError::invalid(
                "`actor` (1-200) and `kind` (1-100) must be given",
            ));
        }
        let app = b.opt_str("app")?;
        let detail = b.opt("detail").cloned().unwrap_or_else(|| json!({}));
        if !detail.is_object() {
            return Err(WireError::invalid("`detail` must be an object"));
        }
        let c = self.conn().await?;
        let request = REQUEST_ID.try_with(String::clone).ok();
        let st = c
            .prepare_cached(
                "INSERT INTO api_audit (actor, key_id, kind, app, app_id, detail, request_id)
                 VALUES ($1, $2, $3, $4, (SELECT id FROM api_apps WHERE name = $4), $5, $6) RETURNING id",
            )
            .await
            .map_err(pg)?;
        let row = c
            .query(
                &st,
                &[&actor, &who.key_id(), &kind, &app, &detail, &request],
            )
            .await
            .map_err(|e| audit_error(e, request.as_deref()))?
            .into_iter()
            .next()
            .ok_or_else(|| WireError::internal("audit insert returned nothing"))?;
        Ok((json!({ "id": row.get::<_, i64>(0) }), vec![]))
    }

    // ---- git push, builds, blobs (the gitserver's, runner's, blobstore's) -------

    /// `push.authorize`: the user whose SSH key `fingerprint` is (as `sshkey.lookup`
    /// finds it: not disabled) may push to `app` when they own it, collaborate on
    /// it or are an admin.
    pub async fn push_authorize(&self, v: &Value) -> Result<Reply, WireError> {
        let b = Body::of(v)?;
        let fp = b.str("fingerprint")?;
        let name = b.str("app")?;
        let c = self.conn().await?;
        let user = q1(
            &c,
            "SELECT u.id, u.name, u.admin FROM api_ssh_keys s JOIN api_users u ON u.id = s.user_id
             WHERE s.fingerprint = $1 AND NOT u.disabled",
            &[&fp],
        )
        .await?
        .ok_or_else(|| not_found(format!("no user has SSH key {fp}")))?;
        let who = Who::User {
            id: user.get(0),
            name: user.get(1),
            admin: user.get(2),
            key_id: String::new(),
        };
        let user_name: String = user.get(1);
        let app = self
            .app_for(&c, &who, name, Need::Access, "push to it", false)
            .await
            .map_err(|e| {
                if e.code == Code::Forbidden {
                    forbidden(format!(
                        "user {user_name} may not push to app {name}: only its owner and collaborators may (its owner can add them with `paddock access add {user_name}`)"
                    ))
                } else {
                    e
                }
            })?;
        Ok((
            json!({"user": user_name, "app": app.name, "app_id": app.id}),
            vec![],
        ))
    }

    /// `release.get`: one release with its config, for the runner.
    pub async fn release_get(&self, who: &Who, v: &Value) -> Result<Reply, WireError> {
        let b = Body::of(v)?;
        let version = b
            .version("version")?
            .ok_or_else(|| WireError::invalid("`version` is required"))?;
        let (c, app) = self.readable(who, &b, "read its releases").await?;
        let mut release = self.release(&c, app.id, version, true).await?;
        release["app"] = json!(app.name);
        Ok((json!({ "release": release }), vec![]))
    }

    /// `blob.referenced`: every blob something still needs, by the name the
    /// blobstore gives it (the bare sha256: a slug recorded as `sha256:<hex>` is
    /// named `<hex>`): the slugs of each app's newest `keep` releases and of its
    /// current release (however old), and every buildpack's blob. One statement,
    /// so one snapshot: a release made meanwhile is either in it or newer than the
    /// blobstore's walk (which spares blobs younger than its grace).
    pub async fn blob_referenced(&self, v: &Value) -> Result<Reply, WireError> {
        let b = Body::of(v)?;
        let keep = match b.opt_i64("keep")? {
            None => DEFAULT_KEEP_RELEASES,
            Some(n) if (1..=10_000).contains(&n) => n as i32,
            Some(n) => {
                return Err(WireError::invalid(format!(
                    "`keep` must be 1-10000, not {n}"
                )))
            }
        };
        let c = self.conn().await?;
        let rows = q(
            &c,
            "SELECT r.slug FROM api_releases r JOIN api_apps a ON a.id = r.app_id
             WHERE r.slug IS NOT NULL
               AND (r.version = a.current_release OR r.version > a.next_release - 1 - $1)
             UNION
             SELECT blob FROM api_buildpacks
             ORDER BY 1",
            &[&keep],
        )
        .await?;
        let blobs: std::collections::BTreeSet<String> = rows
            .iter()
            .map(|r| {
                let id: String = r.get(0);
                match id.strip_prefix("sha256:") {
                    Some(hex) => hex.to_string(),
                    None => id,
                }
            })
            .collect();
        Ok((json!({ "blobs": blobs, "keep": keep }), vec![]))
    }

    fn buildpack_json(r: &Row) -> Value {
        json!({"name": r.get::<_, String>(0), "blob": r.get::<_, String>(1),
               "url": r.get::<_, Option<String>>(2), "created_by": r.get::<_, String>(3),
               "created_at": r.get::<_, i64>(4)})
    }

    /// `buildpack.add`: records (or replaces) buildpack `name` as `blob`.
    pub async fn buildpack_add(&self, who: &Who, v: &Value) -> Result<Reply, WireError> {
        let b = Body::of(v)?;
        let name = b.str("name")?;
        names::buildpack(name)?;
        let blob = names::blob_sha256("blob", b.str("blob")?)?;
        let url = b.opt_str("url")?;
        if url.is_some_and(|u| u.len() > 2048 || u.chars().any(char::is_control)) {
            return Err(WireError::invalid(
                "`url` must be at most 2048 characters, without control characters",
            ));
        }
        let mut c = self.conn().await?;
        let tx = c.transaction().await.map_err(pg)?;
        let old: Option<String> = q1(
            &tx,
            "SELECT blob FROM api_buildpacks WHERE name = $1 FOR UPDATE",
            &[&name],
        )
        .await?
        .map(|r| r.get(0));
        let row = q1(
            &tx,
            &format!(
                "INSERT INTO api_buildpacks (name, blob, url, created_by) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (name) DO UPDATE SET blob = $2, url = $3, created_by = $4, created_at = now()
                 RETURNING name, blob, url, created_by, {MS}"
            ),
            &[&name, &blob, &url, &who.actor()],
        )
        .await?
        .ok_or_else(|| WireError::internal("buildpack insert returned nothing"))?;
        audit(
            &tx,
            who,
            "buildpack.add",
            None,
            json!({"name": name, "blob": blob, "url": url, "replaced": old}),
        )
        .await?;
        commit(tx).await?;
        Ok((
            json!({"buildpack": Self::buildpack_json(&row), "replaced": old}),
            vec![],
        ))
    }

    pub async fn buildpack_list(&self) -> Result<Reply, WireError> {
        let c = self.conn().await?;
        let rows = q(
            &c,
            &format!("SELECT name, blob, url, created_by, {MS} FROM api_buildpacks ORDER BY name"),
            &[],
        )
        .await?;
        let list: Vec<Value> = rows.iter().map(Self::buildpack_json).collect();
        Ok((json!({ "buildpacks": list }), vec![]))
    }

    pub async fn buildpack_get(&self, v: &Value) -> Result<Reply, WireError> {
        let b = Body::of(v)?;
        let name = b.str("name")?;
        let c = self.conn().await?;
        let row = q1(
            &c,
            &format!(
                "SELECT name, blob, url, created_by, {MS} FROM api_buildpacks WHERE name = $1"
            ),
            &[&name],
        )
        .await?
        .ok_or_else(|| {
            not_found(format!(
                "no buildpack is named {name:?} (`paddock buildpacks` lists them)"
            ))
        })?;
        Ok((json!({ "buildpack": Self::buildpack_json(&row) }), vec![]))
    }

    pub async fn buildpack_remove(&self, who: &Who, v: &Value) -> Result<Reply, WireError> {
        let b = Body::of(v)?;
        let name = b.str("name")?;
        let mut c = self.conn().await?;
        let tx = c.transaction().await.map_err(pg)?;
        let blob: String = q1(
            &tx,
            "DELETE FROM api_buildpacks WHERE name = $1 RETURNING blob",
            &[&name],
        )
        .await?
        .map(|r| r.get(0))
        .ok_or_else(|| {
            not_found(format!(
                "no buildpack is named {name:?} (`paddock buildpacks` lists them)"
            ))
        })?;
        audit(
            &tx,
            who,
            "buildpack.remove",
            None,
            json!({"name": name, "blob": blob}),
        )
        .await?;
        commit(tx).await?;
        Ok((json!({"name": name, "blob": blob}), vec![]))
    }

    /// The app `b` names, for a kind the api forwards to another daemon once the
    /// caller may `what` (access).
    pub async fn authorize_app(
        &self,
        who: &Who,
        v: &Value,
        what: &str,
    ) -> Result<String, WireError> {
        let b = Body::of(v)?;
        let (_c, app) = self.readable(who, &b, what).await?;
        Ok(app.name)
    }

    // ---- customers' operations: one-offs, restarts, deploys ---------------------

    /// What a one-off of the app `b` names runs: the app's current release, which
    /// must have code (a slug). (app, version, slug).
    pub async fn run_target(
        &self,
        who: &Who,
        v: &Value,
    ) -> Result<(String, i32, String), WireError> {
        let b = Body::of(v)?;
        let (c, app) = self.readable(who, &b, "run commands in it").await?;
        let row = q1(
            &c,
            "SELECT r.version, r.slug FROM api_apps a JOIN api_releases r
               ON r.app_id = a.id AND r.version = a.current_release WHERE a.id = $1",
            &[&app.id],
        )
        .await?;
        match row.map(|r| (r.get::<_, i32>(0), r.get::<_, Option<String>>(1))) {
            Some((version, Some(slug))) => Ok((app.name, version, slug)),
            Some((version, None)) => Err(conflict(format!(
                "{} has no code to run yet: its current release v{version} has no build (push with git first)",
                app.name
            ))),
            None => Err(conflict(format!(
                "{} has no current release: push with git first",
                app.name
            ))),
        }
    }

    /// The app `b` names (access) and its formation.
    pub async fn app_formation(
        &self,
        who: &Who,
        v: &Value,
        what: &str,
    ) -> Result<(String, Vec<Value>), WireError> {
        let b = Body::of(v)?;
        let (c, app) = self.readable(who, &b, what).await?;
        let f = self.formation_of(&c, app.id).await?;
        Ok((app.name, f))
    }

    /// An audit row for something done on `app` outside the database (a one-off,
    /// a restart), once it was done.
    pub async fn audit_on(
        &self,
        who: &Who,
        app: &str,
        kind: &str,
        detail: Value,
    ) -> Result<(), WireError> {
        let c = self.conn().await?;
        let app = self
            .app_for(&c, who, app, Need::Access, "use it", false)
            .await?;
        audit(&c, who, kind, Some(&app), detail).await?;
        Ok(())
    }

    /// The scheduler's rows in the app's log from id `from` on (at most
    /// `MAX_DEPLOY_EVENTS`), as deploy events.
    async fn deploy_events(
        &self,
        c: &impl GenericClient,
        app: i64,
        from: i64,
    ) -> Result<Vec<crate::deploys::Event>, WireError> {
        let kinds: Vec<&str> = crate::deploys::KINDS.to_vec();
        let rows = q(
            c,
            "SELECT id, (extract(epoch from at) * 1000)::bigint, kind, detail FROM api_audit
             WHERE app_id = $1 AND kind = ANY($2) AND id >= $3 ORDER BY id LIMIT $4",
            &[&app, &kinds, &from, &MAX_DEPLOY_EVENTS],
        )
        .await?;
        Ok(rows
            .iter()
            .map(|r| crate::deploys::Event {
                id: r.get(0),
                at: r.get(1),
                kind: r.get(2),
                detail: r.get(3),
            })
            .collect())
    }

    /// The first event of each of the app's newest `n` deployed versions (by
    /// version), newest first.
    async fn deploy_versions(
        &self,
        c: &impl GenericClient,
        app: i64,
        only: Option<i32>,
        n: i64,
    ) -> Result<Vec<(i64, i64)>, WireError> {
        let kinds: Vec<&str> = crate::deploys::KINDS.to_vec();
        let only = only.map(i64::from);
        let rows = q(
            c,
            "SELECT v, min(id) FROM (
               SELECT id, (detail->>'version')::bigint AS v FROM api_audit
               WHERE app_id = $1 AND kind = ANY($2) AND jsonb_typeof(detail->'version') = 'number'
                 AND detail->>'version' ~ '^[1-9][0-9]{0,8}$') x
             WHERE $3::bigint IS NULL OR v = $3
             GROUP BY v ORDER BY v DESC LIMIT $4",
            &[&app, &kinds, &only, &n],
        )
        .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    pub async fn deploy_list(&self, who: &Who, v: &Value) -> Result<Reply, WireError> {
        let b = Body::of(v)?;
        let n = limit(&b, 15, 100)?;
        let (c, app) = self.readable(who, &b, "see its deploys").await?;
        let versions = self.deploy_versions(&c, app.id, None, n).await?;
        let Some(from) = versions.iter().map(|(_, id)| *id).min() else {
            return Ok((json!({ "deploys": [] }), vec![]));
        };
        let wanted: std::collections::BTreeSet<i64> = versions.iter().map(|(v, _)| *v).collect();
        let events = self.deploy_events(&c, app.id, from).await?;
        let list: Vec<Value> = crate::deploys::trail(&events)
            .iter()
            .filter(|d| wanted.contains(&d.version))
            .map(|d| d.summary())
            .collect();
        Ok((json!({ "deploys": list }), vec![]))
    }

    pub async fn deploy_info(&self, who: &Who, v: &Value) -> Result<Reply, WireError> {
        let b = Body::of(v)?;
        let version = b
            .version("version")?
            .ok_or_else(|| WireError::invalid("`version` is required (7 or \"v7\")"))?;
        let (c, app) = self.readable(who, &b, "see its deploys").await?;
        let missing = || {
            not_found(format!(
                "{} has no deploy of v{version} (`paddock deploys` lists them)",
                app.name
            ))
        };
        let (_, from) = *self
            .deploy_versions(&c, app.id, Some(version), 1)
            .await?
            .first()
            .ok_or_else(missing)?;
        let events = self.deploy_events(&c, app.id, from).await?;
        let d = crate::deploys::trail(&events)
            .into_iter()
            .find(|d| d.version == i64::from(version))
            .ok_or_else(missing)?;
        Ok((json!({ "deploy": d.with_lines() }), vec![]))
    }

    // ---- desired state for the scheduler ---------------------------------------

    async fn state_of(
        &self,
        c: &impl GenericClient,
        id: i64,
        name: &str,
    ) -> Result<Value, WireError> {
        let cur: Option<i32> = q1(
            c,
            "SELECT current_release FROM api_apps WHERE id = $1",
            &[&id],
        )
        .await?
        .and_then(|r| r.get(0));
        let current = match cur {
            Some(v) => Some(self.release(c, id, v, true).await?),
            None => None,
        };
        let pending: Option<i32> = q1(
            c,
            "SELECT max(version) FROM api_releases WHERE app_id = $1 AND status = 'pending' AND version > COALESCE($2, 0)",
            &[&id, &cur],
        )
        .await?
        .and_then(|r| r.get(0));
        let pending = match pending {
            Some(v) => Some(self.release(c, id, v, true).await?),
            None => None,
        };
        let formation = self.formation_of(c, id).await?;
        let domains: Vec<Value> = self
            .domains_of(c, id)
            .await?
            .into_iter()
            .map(|d| d["domain"].clone())
            .collect();
        // Health checks of the release being rolled out, else the current one's; a
        // process type with none is checked by a TCP connect to $PORT.
        let of = pending.as_ref().or(current.as_ref());
        let mut checks = Map::new();
        if let Some(r) = of {
            let given = r["healthchecks"].as_object().cloned().unwrap_or_default();
            for t in r["process_types"]
                .as_object()
                .map(|m| m.keys().cloned().collect::<Vec<_>>())
                .unwrap_or_default()
            {
                let c = given
                    .get(&t)
                    .cloned()
                    .unwrap_or_else(|| json!([{"type": "tcp"}]));
                checks.insert(t, c);
            }
        }
        let scheduling = of.map_or_else(|| json!({}), |r| r["scheduling"].clone());
        Ok(
            json!({"name": name, "id": id, "current": current, "pending": pending,
                  "formation": formation, "domains": domains, "healthchecks": checks,
                  "scheduling": scheduling}),
        )
    }

    pub async fn app_state(&self, v: &Value) -> Result<Reply, WireError> {
        let b = Body::of(v)?;
        let name = b.str("app")?;
        let c = self.conn().await?;
        let id: i64 = q1(&c, "SELECT id FROM api_apps WHERE name = $1", &[&name])
            .await?
            .map(|r| r.get(0))
            .ok_or_else(|| not_found(format!("app {name} does not exist")))?;
        Ok((json!({ "app": self.state_of(&c, id, name).await? }), vec![]))
    }

    pub async fn apps_state(&self) -> Result<Reply, WireError> {
        let c = self.conn().await?;
        let rows = q(&c, "SELECT id, name FROM api_apps ORDER BY name", &[]).await?;
        let mut apps = vec![];
        for r in rows {
            apps.push(self.state_of(&c, r.get(0), &r.get::<_, String>(1)).await?);
        }
        Ok((json!({ "apps": apps }), vec![]))
    }
}

/// `scheduling` from app.json's formation: `{"worker": {"stop_after_disconnect":
/// SECONDS}}` (1 to 86400), for process types the release has.
fn check_scheduling(h: &Value, types: &Map<String, Value>) -> Result<(), WireError> {
    let m = h.as_object().ok_or_else(|| {
        WireError::invalid(
            "`scheduling` must be an object of process type: {stop_after_disconnect}",
        )
    })?;
    for (t, v) in m {
        if !types.contains_key(t) {
            return Err(WireError::invalid(format!(
                "scheduling names process type {t}, which the release does not have"
            )));
        }
        let o = v
            .as_object()
            .ok_or_else(|| WireError::invalid(format!("scheduling.{t} must be an object")))?;
        for (k, n) in o {
            match (k.as_str(), n.as_i64()) {
                ("stop_after_disconnect", Some(n)) if (1..=86_400).contains(&n) => {}
                ("stop_after_disconnect", _) => {
                    return Err(WireError::invalid(format!(
                        "scheduling.{t}.stop_after_disconnect must be 1-86400 seconds"
                    )))
                }
                (other, _) => {
                    return Err(WireError::invalid(format!(
                        "scheduling.{t}: unknown setting {other:?} (known: stop_after_disconnect)"
                    )))
                }
            }
        }
    }
    Ok(())
}

/// Dokku's `healthchecks` from app.json: `{"web": [{"type", "path", "timeout",
/// "attempts"}]}`, for process types the release has.
fn check_healthchecks(h: &Value, types: &Map<String, Value>) -> Result<(), WireError> {
    let m = h.as_object().ok_or_else(|| {
        WireError::invalid("`healthchecks` must be an object of process type: [checks]")
    })?;
    for (t, checks) in m {
        if !types.contains_key(t) {
            return Err(WireError::invalid(format!(
                "healthchecks name process type {t}, which the release does not have"
            )));
        }
        let list = checks
            .as_array()
            .ok_or_else(|| WireError::invalid(format!("healthchecks.{t} must be a list")))?;
        for c in list {
            let cb = Body::of(c)?;
            if let Some(p) = cb.opt_str("path")? {
                if !p.starts_with('/')
                    || p.len() > 1024
                    || p.chars().any(|c| c.is_control() || c == ' ')
                {
                    return Err(WireError::invalid(format!(
                        "healthchecks.{t}: path {p:?} must start with / and hold no spaces"
                    )));
                }
            }
            if let Some(n) = cb.opt_i64("timeout")? {
                if !(1..=120).contains(&n) {
                    return Err(WireError::invalid(format!(
                        "healthchecks.{t}: timeout must be 1-120 seconds"
                    )));
                }
            }
            if let Some(n) = cb.opt_i64("attempts")? {
                if !(1..=60).contains(&n) {
                    return Err(WireError::invalid(format!(
                        "healthchecks.{t}: attempts must be 1-60"
                    )));
                }
            }
        }
    }
    Ok(())
}
