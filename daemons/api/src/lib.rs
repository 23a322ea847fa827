//! paddock-api: the front door for people. Users, their keys (user keys derived
//! with HKDF, so the database holds no secret that verifies a request), SSH keys,
//! apps, collaborators, config vars and the releases they make, formation,
//! domains and the audit log (docs/PROTOCOL.md, "api").
//!
//! Architecture invariant: stateless. Every answer comes from the database; any
//! number of apis may serve one. User keys reach only this daemon's
//! `Routes::on_user` kinds, and each of those authorizes the caller itself.

use std::rc::Rc;
use std::time::Duration;

use paddock_config::{ClusterConfig, ConfigError};
use paddock_daemon::{Caller, Ctx, LoopKind, Routes, Spec};
use paddock_db::Db;
use paddock_wire::{kinds, Code, Envelope, WireError};
use serde_json::{json, Value};

mod auth;
mod body;
pub mod names;
pub mod settings;
pub mod sshkey;
mod store;

pub use auth::Who;
pub use settings::{settings, ApiSection, Settings};
use store::{Reply, Store};

/// The kinds a user key may send (each authorizes its caller).
pub const USER_KINDS: &[&str] = &[
    "whoami",
    "user.create",
    "user.list",
    "user.revoke",
    "key.create",
    "key.rotate",
    "key.list",
    "key.revoke",
    "sshkey.add",
    "sshkey.list",
    "sshkey.remove",
    "app.create",
    "app.list",
    "app.info",
    "app.destroy",
    "access.list",
    "access.add",
    "access.remove",
    "config.get",
    "config.set",
    "config.unset",
    "release.list",
    "release.info",
    "rollback",
    "formation.get",
    "formation.scale",
    "domain.list",
    "domain.add",
    "domain.remove",
    "audit.list",
];

/// Kinds only the cluster key may send (other daemons use them instead of SQL).
pub const CLUSTER_KINDS: &[&str] = &[
    "release.create",
    "release.status",
    "audit.append",
    "app.state",
    "apps.state",
    "sshkey.lookup",
];

/// Published after a change commits: `{"app", "what"}`.
pub const APP_CHANGED: &str = "app.changed";

pub fn spec() -> Spec {
    Spec {
        name: settings::NAME,
        version: env!("CARGO_PKG_VERSION"),
        pull: false,
        publish: true,
        user_keys: Some(settings::user_keys),
        check,
        push_to: paddock_daemon::no_push_to,
    }
}

fn check(cfg: &ClusterConfig) -> Result<(), ConfigError> {
    settings(cfg).map(|_| ())
}

struct Api {
    store: Store,
    ready: std::cell::Cell<bool>,
    ctx: Ctx,
    cleanup_timeout: Duration,
    /// The users' CURVE keys the rpc socket admits (`None` in plaintext).
    admitted: Option<paddock_wire::curve::Admitted>,
    /// One refresh of `admitted` at a time, so an older read never replaces a newer.
    refreshing: tokio::sync::Mutex<()>,
}

impl Api {
    async fn handle(&self, env: Envelope, caller: Caller) -> Result<Value, WireError> {
        if !self.ready.get() {
            return Err(WireError::unavailable(
                "the api has not finished migrating its database yet; retry shortly",
            ));
        }
        // The key first (check 2: a revoked key is `unknown_key` whatever it asks),
        // then what it may send (check 7).
        let who = self
            .store
            .resolve(&caller.key_id, caller.user, &env.from)
            .await?;
        if caller.user && CLUSTER_KINDS.contains(&env.kind.as_str()) {
            return Err(auth::forbidden(format!(
                "`{}` is for the cluster's own daemons; a user key may not send it",
                env.kind
            )));
        }
        let s = &self.store;
        let b = &env.body;
        let (reply, changes): Reply = match env.kind.as_str() {
            "whoami" => s.whoami(&who).await?,
            "user.create" => s.user_create(&who, b).await?,
            "user.list" => s.user_list(&who).await?,
            "user.revoke" => s.user_revoke(&who, b).await?,
            "key.create" => s.key_create(&who, b).await?,
            "key.rotate" => s.key_rotate(&who).await?,
            "key.list" => s.key_list(&who, b).await?,
            "key.revoke" => s.key_revoke(&who, b).await?,
            "sshkey.add" => s.sshkey_add(&who, b).await?,
            "sshkey.list" => s.sshkey_list(&who, b).await?,
            "sshkey.remove" => s.sshkey_remove(&who, b).await?,
            "sshkey.lookup" => s.sshkey_lookup(b).await?,
            "app.create" => s.app_create(&who, b).await?,
            "app.list" => s.app_list(&who, b).await?,
            "app.info" => s.app_info(&who, b).await?,
            "app.destroy" => self.destroy(&who, b).await?,
            "access.list" => s.access_list(&who, b).await?,
            "access.add" => s.access_add(&who, b).await?,
            "access.remove" => s.access_remove(&who, b).await?,
            "config.get" => s.config_get(&who, b).await?,
            "config.set" => s.config_set(&who, b).await?,
            "config.unset" => s.config_unset(&who, b).await?,
            "release.list" => s.release_list(&who, b).await?,
            "release.info" => s.release_info(&who, b).await?,
            "rollback" => s.rollback(&who, b).await?,
            "formation.get" => s.formation_get(&who, b).await?,
            "formation.scale" => s.formation_scale(&who, b).await?,
            "domain.list" => s.domain_list(&who, b).await?,
            "domain.add" => s.domain_add(&who, b).await?,
            "domain.remove" => s.domain_remove(&who, b).await?,
            "audit.list" => s.audit_list(&who, b).await?,
            "release.create" => s.release_create(&who, b).await?,
            "release.status" => s.release_status(&who, b).await?,
            "audit.append" => s.audit_append(&who, b).await?,
            "app.state" => s.app_state(b).await?,
            "apps.state" => s.apps_state().await?,
            other => {
                return Err(WireError::new(
                    Code::UnknownKind,
                    format!("paddock-api does not handle `{other}`"),
                ))
            }
        };
        if matches!(
            env.kind.as_str(),
            "user.create" | "user.revoke" | "key.create" | "key.rotate" | "key.revoke"
        ) {
            self.store.forget_keys();
            // Before the reply goes out: a client given a new key connects at once,
            // and libzmq does not retry a CURVE handshake the ZAP handler refused.
            if let Err(e) = self.refresh_admitted().await {
                tracing::warn!("{e:#}; the refresher retries");
            }
        }
        for c in changes {
            self.ctx
                .server()
                .publish(APP_CHANGED, json!({"app": c.app, "what": c.what}));
        }
        Ok(reply)
    }

    /// Re-reads the CURVE keys of the live user keys into the rpc socket's set.
    async fn refresh_admitted(&self) -> anyhow::Result<()> {
        let Some(admitted) = &self.admitted else {
            return Ok(());
        };
        let _one = self.refreshing.lock().await;
        let keys = self
            .store
            .admitted_curve_keys()
            .await
            .map_err(|e| anyhow::anyhow!("cannot read the users' CURVE keys: {}", e.message))?;
        admitted.replace(
            keys.iter()
                .filter_map(|k| paddock_wire::curve::Key::from_z85(k).ok()),
        );
        Ok(())
    }

    /// `app.destroy`: the rows go in one transaction; then the app's balancer
    /// routes and runner instances are removed, best effort, and reported.
    async fn destroy(&self, who: &Who, b: &Value) -> Result<Reply, WireError> {
        let (app, domains) = self.store.app_destroy(who, b).await?;
        self.ctx
            .server()
            .publish(APP_CHANGED, json!({"app": app, "what": "destroyed"}));
        let calls = self.ctx.calls();
        let t = self.cleanup_timeout;
        let mut routes = vec![];
        for ep in calls.find("balancer").await.unwrap_or_default() {
            let r = calls
                .call(&ep, kinds::ROUTE_REMOVE, json!({ "app": app }), t)
                .await;
            routes.push(json!({"balancer": ep, "result": outcome(r)}));
        }
        // Every runner stops the app's instances and, once they have stopped,
        // forgets them and removes the app's account (`app.purge`).
        let mut instances = vec![];
        for ep in calls.find("runner").await.unwrap_or_default() {
            let r = calls
                .call(&ep, kinds::APP_PURGE, json!({ "app": app }), t)
                .await;
            let entry = match r {
                Ok(v) => {
                    json!({"runner": ep, "result": if v["purged"] == true { "done" } else { "stopping" },
                                "instances": v.get("instances_removed").or(v.get("stopping")).cloned().unwrap_or(json!([])),
                                "user_removed": v.get("user_removed").cloned().unwrap_or(json!(false))})
                }
                Err(e) => json!({"runner": ep, "result": e.to_string()}),
            };
            instances.push(entry);
        }
        tracing::info!(app = %app, "app destroyed");
        Ok((
            json!({"app": app, "cleanup": {"domains": domains, "routes": routes, "instances": instances}}),
            vec![],
        ))
    }
}

fn outcome(r: Result<Value, paddock_wire::ClientError>) -> String {
    match r {
        Ok(_) => "done".into(),
        Err(e) => e.to_string(),
    }
}

pub async fn setup(ctx: Ctx) -> anyhow::Result<Routes> {
    let s = settings(&ctx.config())?;
    let db = Db::new(&s.database_url, s.pool_size)?;
    let api = Rc::new(Api {
        store: Store::new(db, s.user_keys.clone(), s.apps_domain.clone()),
        ready: std::cell::Cell::new(false),
        ctx: ctx.clone(),
        cleanup_timeout: s.cleanup_timeout,
        admitted: ctx.user_clients().cloned(),
        refreshing: tokio::sync::Mutex::new(()),
    });

    // The rpc socket is bound already and refuses every user until their CURVE keys
    // are read, and libzmq never retries a refused handshake: a user's connection
    // that comes back after an api restart stays dead. So read them first, before
    // migrating (after a restart the table is there), keeping the window short. A
    // database that is down or not migrated yet only delays this (the loop below
    // reads them again).
    if api.admitted.is_some() {
        match tokio::time::timeout(Duration::from_secs(1), api.refresh_admitted()).await {
            Ok(Ok(())) => tracing::debug!("users' CURVE keys read before migrating"),
            Ok(Err(e)) => tracing::debug!("users' CURVE keys not read yet: {e:#}"),
            Err(_) => tracing::debug!("users' CURVE keys not read yet: the database is slow"),
        }
    }

    // Migrate before serving; retried with backoff while the database is down.
    let (a, url) = (api.clone(), s.database_url.clone());
    ctx.spawn_loop("migrate", LoopKind::Resilient, move || {
        let (a, url) = (a.clone(), url.clone());
        async move {
            if !a.ready.get() {
                paddock_db::migrate(&url).await?;
                a.ready.set(true);
                a.refresh_admitted().await?;
                tracing::info!("api database ready");
            }
            std::future::pending().await
        }
    });

    // The users' CURVE keys the rpc socket admits: re-read every admit_refresh
    // (other apis change them too), and by `handle` at once after a change here.
    if api.admitted.is_some() {
        let (a, every) = (api.clone(), s.admit_refresh);
        ctx.spawn_loop("admit-users", LoopKind::Resilient, move || {
            let a = a.clone();
            async move {
                loop {
                    if a.ready.get() {
                        a.refresh_admitted().await?;
                    }
                    tokio::time::sleep(every).await;
                }
            }
        });
    }

    let mut routes = Routes::new();
    for kind in USER_KINDS.iter().chain(CLUSTER_KINDS) {
        let a = api.clone();
        routes = routes.on_user(kind, move |env: Envelope, caller: Caller| {
            let a = a.clone();
            async move {
                let id = env.id.clone();
                store::REQUEST_ID.scope(id, a.handle(env, caller)).await
            }
        });
    }
    Ok(routes)
}
