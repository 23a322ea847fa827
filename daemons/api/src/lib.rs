//! paddock-api: the front door for people. Users, their keys (user keys derived
//! with HKDF, so the database holds no secret that verifies a request), SSH keys,
//! apps, collaborators, config vars and the releases they make, formation,
//! domains, buildpack records and the audit log (docs/PROTOCOL.md, "api"). For
//! git push it answers the gitserver (`push.authorize`), the runner
//! (`release.get`) and the blobstore (`blob.referenced`), and passes customers'
//! `build.*` to a deployer once it has authorized them.
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
mod customer;
mod deploys;
mod logs;
pub mod names;
mod runs;
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
    "build.list",
    "build.info",
    kinds::APP_INSTANCES,
    kinds::APP_LOGS,
    kinds::RUN_START,
    kinds::RUN_INPUT,
    kinds::RUN_RESIZE,
    kinds::RUN_OUTPUT,
    kinds::RUN_KILL,
    kinds::DEPLOY_LIST,
    kinds::DEPLOY_INFO,
    kinds::PS_RESTART,
];

/// Kinds only the cluster key may send (other daemons use them instead of SQL).
pub const CLUSTER_KINDS: &[&str] = &[
    "release.create",
    "release.status",
    "audit.append",
    "app.state",
    "apps.state",
    "sshkey.lookup",
    "push.authorize",
    "release.get",
    "blob.referenced",
    "buildpack.add",
    "buildpack.list",
    "buildpack.get",
    "buildpack.remove",
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
    /// The one-offs started through this api: where each runs and whose it is.
    runs: std::cell::RefCell<runs::Runs>,
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
            "app.create" => self.with_urls(s.app_create(&who, b).await?),
            "app.list" => s.app_list(&who, b).await?,
            "app.info" => self.with_urls(s.app_info(&who, b).await?),
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
            "formation.scale" => {
                let place = |app, formation| self.check_placement(app, formation);
                s.formation_scale(&who, b, place).await?
            }
            "domain.list" => s.domain_list(&who, b).await?,
            "domain.add" => s.domain_add(&who, b).await?,
            "domain.remove" => s.domain_remove(&who, b).await?,
            "audit.list" => s.audit_list(&who, b).await?,
            "release.create" => s.release_create(&who, b).await?,
            "release.status" => s.release_status(&who, b).await?,
            "audit.append" => s.audit_append(&who, b).await?,
            "app.state" => s.app_state(b).await?,
            "apps.state" => s.apps_state().await?,
            "push.authorize" => s.push_authorize(b).await?,
            "release.get" => s.release_get(&who, b).await?,
            "blob.referenced" => s.blob_referenced(b).await?,
            "buildpack.add" => s.buildpack_add(&who, b).await?,
            "buildpack.list" => s.buildpack_list().await?,
            "buildpack.get" => s.buildpack_get(b).await?,
            "buildpack.remove" => s.buildpack_remove(&who, b).await?,
            "build.list" | "build.info" => self.build(&who, &env.kind, b).await?,
            kinds::APP_INSTANCES => self.app_instances(&who, b).await?,
            kinds::APP_LOGS => self.app_logs(&who, b).await?,
            kinds::RUN_START => self.run_start(&who, b).await?,
            kinds::RUN_INPUT | kinds::RUN_RESIZE | kinds::RUN_OUTPUT | kinds::RUN_KILL => {
                self.run_op(&who, &env.kind, b).await?
            }
            kinds::DEPLOY_LIST => s.deploy_list(&who, b).await?,
            kinds::DEPLOY_INFO => s.deploy_info(&who, b).await?,
            kinds::PS_RESTART => self.ps_restart(&who, b).await?,
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

    /// `app.create`'s and `app.info`'s reply with the app's `git_url` and
    /// `web_url`.
    fn with_urls(&self, (mut reply, changes): Reply) -> Reply {
        if let Some(name) = reply["app"]["name"].as_str() {
            let cfg = self.ctx.config();
            let url = git_url(&cfg, name);
            reply["app"]["git_url"] = json!(url);
            let web = web_url(&cfg.file, &reply["app"]["domains"]);
            reply["app"]["web_url"] = json!(web);
        }
        (reply, changes)
    }

    /// `build.list` and `build.info`: the caller must have access to the app;
    /// then a deployer (which owns the builds) answers. A build of another app is
    /// `not_found`, as one that does not exist.
    async fn build(&self, who: &Who, kind: &str, b: &Value) -> Result<Reply, WireError> {
        let what = if kind == "build.list" {
            "list its builds"
        } else {
            "see its builds"
        };
        let app = self.store.authorize_app(who, b, what).await?;
        let body = if kind == "build.list" {
            let mut body = json!({ "app": app });
            match b.get("limit") {
                None | Some(Value::Null) => {}
                Some(n) => match n.as_i64() {
                    Some(n) if (1..=1000).contains(&n) => body["limit"] = json!(n),
                    _ => return Err(WireError::invalid("`limit` must be 1-1000")),
                },
            }
            body
        } else {
            let build = match b.get("build") {
                Some(Value::String(id))
                    if (1..=100).contains(&id.len())
                        && id
                            .bytes()
                            .all(|c| c.is_ascii_alphanumeric() || b"-_.:".contains(&c)) =>
                {
                    json!(id)
                }
                None | Some(Value::Null) => return Err(WireError::invalid("`build` is required")),
                Some(_) => {
                    return Err(WireError::invalid(
                        "`build` must be a build id, as `build.list` shows",
                    ))
                }
            };
            json!({ "build": build })
        };
        let reply = self
            .ctx
            .calls()
            .call_daemon("deployer", kind, body)
            .await
            .map_err(|e| deployer_error(kind, e))?;
        Ok((scoped_to_app(kind, &app, &b["build"], reply)?, vec![]))
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

/// `<[daemons.gitserver] ssh>/<app>.git`, or null when this node's cluster file
/// names no gitserver URL.
pub fn git_url(cfg: &ClusterConfig, app: &str) -> Option<String> {
    git_url_of(&cfg.file, app)
}

fn git_url_of(file: &paddock_config::ClusterFile, app: &str) -> Option<String> {
    let base = file
        .daemons
        .get("gitserver")?
        .other
        .get("ssh")?
        .as_str()?
        .trim()
        .trim_end_matches('/');
    (!base.is_empty()).then(|| format!("{base}/{app}.git"))
}

/// `http://DOMAIN[:PORT]/` for the first of the app's `domains` (its default
/// domain comes first) that is not a wildcard; the port is that of this node's
/// `[daemons.balancer] http` (left out when it is 80 or not set). Null for an
/// app without a domain.
fn web_url(file: &paddock_config::ClusterFile, domains: &Value) -> Option<String> {
    let domain = domains
        .as_array()?
        .iter()
        .filter_map(|d| d.as_str().or_else(|| d["domain"].as_str()))
        .find(|d| !d.starts_with("*."))?;
    let port = file
        .daemons
        .get("balancer")
        .and_then(|b| b.other.get("http"))
        .and_then(|h| h.as_str())
        .and_then(|h| h.rsplit_once(':'))
        .and_then(|(_, p)| p.trim_end_matches('/').parse::<u16>().ok())
        .filter(|p| *p != 80);
    Some(match port {
        Some(p) => format!("http://{domain}:{p}/"),
        None => format!("http://{domain}/"),
    })
}

/// A deployer's `build.list` / `build.info` reply as the caller, who may see
/// `app` only, gets it: a list keeps `app`'s builds only; a build of another app
/// is `not_found`, as one that does not exist (never shown, nor said to exist).
fn scoped_to_app(
    kind: &str,
    app: &str,
    asked: &Value,
    mut reply: Value,
) -> Result<Value, WireError> {
    if kind == "build.list" {
        match reply.get_mut("builds").and_then(Value::as_array_mut) {
            Some(list) => list.retain(|x| x["app"].as_str() == Some(app)),
            None => reply["builds"] = json!([]),
        }
    } else {
        let of = reply["build"]["app"]
            .as_str()
            .or_else(|| reply["app"].as_str());
        if of != Some(app) {
            return Err(WireError::new(
                Code::NotFound,
                format!("app {app} has no build {asked} (`paddock builds -a {app}` lists them)"),
            ));
        }
    }
    if let Some(m) = reply.as_object_mut() {
        m.remove("ok");
    }
    Ok(reply)
}

/// A forwarded kind's failure: the deployer's own refusal as it wrote it; not
/// reaching one is `unavailable`.
fn deployer_error(kind: &str, e: paddock_daemon::calls::CallError) -> WireError {
    use paddock_daemon::calls::CallError;
    use paddock_wire::ClientError;
    match e {
        CallError::Call(ClientError::Remote(w)) => w,
        CallError::Call(t @ ClientError::Timeout { .. }) => WireError::unavailable(format!(
            "the deployer did not answer {kind} in time ({t}); retry shortly"
        )),
        other => WireError::unavailable(format!(
            "no deployer could be reached for {kind} ({other}); builds are kept by the deployer: retry once it runs"
        )),
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
        runs: std::cell::RefCell::new(runs::Runs::default()),
    });

    // One-offs nobody attached to for a while are forgotten and killed.
    let a = api.clone();
    ctx.spawn_loop("one-offs", LoopKind::Resilient, move || {
        let a = a.clone();
        async move {
            loop {
                tokio::time::sleep(Duration::from_secs(30)).await;
                a.sweep_runs().await;
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forwarded_build_reply_shows_the_authorized_app_only() {
        let list = json!({"ok": true, "builds": [
            {"id": "b1", "app": "shop"}, {"id": "b2", "app": "other"}, {"id": "b3"}]});
        let r = scoped_to_app("build.list", "shop", &Value::Null, list).unwrap();
        assert_eq!(r, json!({"builds": [{"id": "b1", "app": "shop"}]}));

        let mine = json!({"build": {"id": "b1", "app": "shop", "log": "ok"}});
        let r = scoped_to_app("build.info", "shop", &json!("b1"), mine.clone()).unwrap();
        assert_eq!(r, mine);
        for other in [
            json!({"build": {"id": "b2", "app": "other", "log": "secret"}}),
            json!({"build": {"id": "b2"}, "log": "secret"}),
            json!({}),
        ] {
            let e = scoped_to_app("build.info", "shop", &json!("b2"), other).unwrap_err();
            assert_eq!(e.code, Code::NotFound);
            assert!(!e.message.contains("other") && !e.message.contains("secret"));
            assert!(e.message.contains("shop"), "{}", e.message);
        }
        // The app at the reply's top level (a flat reply) counts too.
        let flat = json!({"id": "b1", "app": "shop", "log": ""});
        assert!(scoped_to_app("build.info", "shop", &json!("b1"), flat).is_ok());
    }

    #[test]
    fn the_web_url_is_the_first_domain_at_the_balancers_http_port() {
        let with = |http: Option<&str>| {
            let mut file = paddock_config::ClusterFile::default();
            if let Some(h) = http {
                let mut d = paddock_config::DaemonSection::default();
                d.other.insert("http".into(), toml::Value::String(h.into()));
                file.daemons.insert("balancer".into(), d);
            }
            file
        };
        let domains = json!(["shop.localhost", "www.shop.example"]);
        assert_eq!(
            web_url(&with(Some("tcp://127.0.0.1:18080")), &domains).as_deref(),
            Some("http://shop.localhost:18080/")
        );
        assert_eq!(
            web_url(&with(Some("tcp://0.0.0.0:80")), &domains).as_deref(),
            Some("http://shop.localhost/")
        );
        assert_eq!(
            web_url(&with(None), &domains).as_deref(),
            Some("http://shop.localhost/")
        );
        // A wildcard is no address; no domain, no URL.
        let wild = json!(["*.shop.example", "a.shop.example"]);
        assert_eq!(
            web_url(&with(None), &wild).as_deref(),
            Some("http://a.shop.example/")
        );
        assert_eq!(web_url(&with(None), &json!([])), None);
        assert_eq!(web_url(&with(None), &Value::Null), None);
    }

    #[test]
    fn git_urls_come_from_the_gitserver_section() {
        let with = |ssh: Option<&str>| {
            let mut file = paddock_config::ClusterFile::default();
            if let Some(u) = ssh {
                let mut d = paddock_config::DaemonSection::default();
                d.other.insert("ssh".into(), toml::Value::String(u.into()));
                file.daemons.insert("gitserver".into(), d);
            }
            file
        };
        assert_eq!(
            git_url_of(&with(Some("ssh://git@h:2222/")), "shop").as_deref(),
            Some("ssh://git@h:2222/shop.git")
        );
        assert_eq!(
            git_url_of(&with(Some("ssh://git@h")), "shop").as_deref(),
            Some("ssh://git@h/shop.git")
        );
        assert_eq!(git_url_of(&with(Some(" ")), "shop"), None);
        assert_eq!(git_url_of(&with(None), "shop"), None);
    }
}
